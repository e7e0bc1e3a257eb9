#!/usr/bin/env python3
"""The Fashion-MNIST anchor's PyTorch recipe (../shared/golden/README.md), timed: the peer of graft's flag-free
finetune for issue 22's wall-time comparison.

    python scripts/anchor-pytorch.py DATA [--epochs 10] [--seed 0] [--threads 2] [--channels-last] [--probe]

DATA is a folder from scripts/fashion-mnist.sh (DATA/train/<class>/*.png, DATA/test/<class>/*.png). The recipe:
ImageNet EfficientNet-Lite0 (../shared/golden/reference/efficientnet_lite0.py, weights from graft's cache),
a new nn.Linear(1280, classes) head with PyTorch's init, dropout 0.2, BatchNorm momentum 0.1, batch 32,
shuffled, 10 epochs, no augmentation, inputs scaled to [0,1] and normalised with mean = std = 0.5; full fine-tune
with Adam 1e-4 (`--probe`: the backbone frozen in eval mode, Adam 1e-3 on the head). Prints one JSON line:
test accuracy on DATA/test, training seconds (the epochs only, not loading or evaluation), seconds per epoch.
Needs torch, numpy and Pillow (a throwaway venv); CI never runs it.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "..", "shared", "golden", "reference"))
from efficientnet_lite0 import load_pretrained  # noqa: E402


def load(folder):
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    xs, ys = [], []
    for i, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(folder, c))):
            im = np.asarray(Image.open(os.path.join(folder, c, f)).convert("RGB"), dtype=np.float32) / 255.0
            xs.append(im)
            ys.append(i)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2)
    return ((x - 0.5) / 0.5).contiguous(), torch.tensor(ys), classes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--probe", action="store_true")
    cache = os.environ.get("GRAFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "graft")
    ap.add_argument("--weights", default=os.path.join(cache, "weights", "efficientnet_lite0.safetensors"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    xtr, ytr, classes = load(os.path.join(args.data, "train"))
    xte, yte, _ = load(os.path.join(args.data, "test"))
    model = load_pretrained(args.weights, dropout=0.2, bn_mom=0.1)
    head = model.reset_head(len(classes))
    if args.probe:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
        opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        if args.probe:
            model.eval()
            model._dropout.train()
        perm = torch.randperm(len(ytr))
        for i in range(0, len(ytr), 32):
            idx = perm[i:i + 32]
            xb = xtr[idx].contiguous(memory_format=fmt)
            loss = loss_fn(model(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_s = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(yte), 256):
            correct += (model(xte[i:i + 256].contiguous(memory_format=fmt)).argmax(1) == yte[i:i + 256]).sum().item()
    print(json.dumps({"peer": "pytorch " + torch.__version__, "recipe": "probe" if args.probe else "finetune",
                      "channels_last": args.channels_last, "seed": args.seed, "epochs": args.epochs,
                      "test_acc": correct / len(yte), "train_s": round(train_s, 1),
                      "s_per_epoch": round(train_s / args.epochs, 2)}))


if __name__ == "__main__":
    main()
