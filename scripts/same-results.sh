#!/usr/bin/env bash
# Checks that two graft binaries train bit-identically: fixed-seed finetune runs (dense encoder with a frozen
# phase and the feature cache, gradual unfreezing with the plateau schedule, clipping and dropout,
# EfficientNet-Lite0 with a frozen stem, a classifier from an ae: run) and pretrain runs (autoencoder with
# early stopping per phase, RBMs), then compares metrics.jsonl (wall-clock fields aside), the last
# checkpoint's model tensors and the encoder files byte for byte. For refactors that must not change results.
#
#   scripts/same-results.sh OLD_GRAFT NEW_GRAFT [WORK_DIR]
#
# Needs python3 and Fashion-MNIST (scripts/fashion-mnist.sh installs it); EfficientNet-Lite0's weights
# (scripts/fetch-efficientnet-lite0.sh) for the third run.
set -euo pipefail
old=$1 new=$2 work=${3:-$(mktemp -d)}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work"
if [ ! -d "$work/fm/train" ]; then
  cargo run -q --manifest-path "$here/Cargo.toml" --example fashion_mnist_folder -- \
    --out "$work/fm" --per-class 12 --size 28 --test-per-class 4
  cargo run -q --manifest-path "$here/Cargo.toml" --example fashion_mnist_folder -- \
    --out "$work/fm32" --per-class 6 --size 32 --rgb --test-per-class 2
fi
runs() {
  local g=$1 d=$2
  rm -rf "$d"; mkdir -p "$d"
  $g finetune --base dense:784,64,32 --data "$work/fm/train" --image-size 28 --freeze-epochs 1 --epochs 2 \
    --patience 2 --seed 3 --run-dir "$d/ft1" --quiet > "$d/ft1.out"
  $g finetune --base dense:784,64,32 --data "$work/fm/train" --image-size 28 --schedule plateau \
    --optimizer momentum --unfreeze-at 2:stage2 --freeze-epochs 1 --epochs 3 --clip-grad-norm 1 --hidden 16 \
    --dropout 0.3 --run-dir "$d/ft2" --quiet > "$d/ft2.out"
  $g finetune --base efficientnet_lite0 --data "$work/fm32/train" --image-size 32 --freeze stem \
    --freeze-epochs 1 --epochs 1 --batch-size 8 --seed 1 --dropout 0.2 --run-dir "$d/ft3" --quiet > "$d/ft3.out"
  $g pretrain --arch dense:784,64,32 --data "$work/fm/train" --stage-epochs 2 --finetune-epochs 1 --patience 1 \
    --seed 2 --run-dir "$d/pt1" --quiet > "$d/pt1.out"
  $g pretrain --method rbm --arch dense:784,64,32:sigmoid --data "$work/fm/train" --stage-epochs 2 \
    --finetune-epochs 0 --schedule plateau --seed 2 --run-dir "$d/pt2" --quiet > "$d/pt2.out"
  $g finetune --base "ae:$d/pt1" --data "$work/fm/train" --freeze-epochs 1 --epochs 1 --seed 4 \
    --run-dir "$d/ft4" --quiet > "$d/ft4.out"
}
runs "$old" "$work/old" 2>/dev/null
runs "$new" "$work/new" 2>/dev/null
python3 - "$work/old" "$work/new" <<'PY'
import json, os, struct, sys
def tensors(p):
    b = open(p, 'rb').read(); n = struct.unpack('<Q', b[:8])[0]; h = json.loads(b[8:8 + n]); d = b[8 + n:]
    return {k: d[v['data_offsets'][0]:v['data_offsets'][1]] for k, v in h.items() if k.startswith('model.')}
def metrics(p):
    out = []
    for line in open(p):
        m = json.loads(line); m.pop('seconds', None); m.pop('images_per_s', None); out.append(m)
    return out
a, b = sys.argv[1], sys.argv[2]; bad = 0
for run in sorted(r for r in os.listdir(a) if os.path.isdir(os.path.join(a, r))):
    pa, pb = os.path.join(a, run), os.path.join(b, run)
    same_m = metrics(pa + '/metrics.jsonl') == metrics(pb + '/metrics.jsonl')
    same_w = tensors(pa + '/last.safetensors') == tensors(pb + '/last.safetensors')
    enc = pa + '/encoder.safetensors'
    same_e = not os.path.exists(enc) or open(enc, 'rb').read() == open(pb + '/encoder.safetensors', 'rb').read()
    print(f"{run}: metrics {'same' if same_m else 'DIFFER'}, last weights {'same' if same_w else 'DIFFER'}"
          + ('' if not os.path.exists(enc) else f", encoder {'same' if same_e else 'DIFFERS'}"))
    bad += not (same_m and same_w and same_e)
sys.exit(1 if bad else 0)
PY
