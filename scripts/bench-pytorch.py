#!/usr/bin/env python3
"""PyTorch's side of `cargo bench --bench train_step`: the same configurations, the same JSON keys.

    python3 scripts/bench-pytorch.py                      # every configuration
    python3 scripts/bench-pytorch.py resnet18 224 train   # filters: any of model, size, mode

Modes, at batch 16 (GRAFT_BENCH_BATCH):
  forward  inference under torch.no_grad(), model.eval();
  train    full training step: model.train(), cross-entropy, backward, SGD momentum 0.9 step;
  frozen   frozen-backbone step: backbone in eval mode without gradients, only the new classifier trains.

Each configuration runs in a fresh interpreter (this script again, with --one), so the peak resident memory
(VmHWM) is that configuration's alone. One warm-up batch, then GRAFT_BENCH_ITERS (default 5) timed batches;
images/s is the batch size over the median batch time. The networks are written out here (torchvision's
ResNet-18 layout; EfficientNet-Lite0 as graft builds it, with TensorFlow "SAME" padding and ReLU6), so only
torch itself is needed. Weights are a fresh initialisation: the cost is the same as with pretrained ones.

GRAFT_BENCH_SETTING picks PyTorch's CPU setting: `nchw` (the default layout, float32), `channels_last`
(`model.to(memory_format=torch.channels_last)` and the input alike) or `channels_last_bf16` (that plus
`torch.autocast("cpu", dtype=torch.bfloat16)` around the forward and loss, oneDNN's bf16 convolutions).
"""

import json
import os
import subprocess
import sys
import time

MODELS = ["resnet18", "efficientnet_lite0", "efficientnet_b0", "mobilenetv3_large_100", "convnext_atto",
          "convnext_tiny", "vit_small_patch16_224"]
SIZES = [128, 224]
MODES = ["forward", "train", "frozen"]
CLASSES = 1000


def build(model):
    import torch.nn as nn
    import torch.nn.functional as F

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            h = F.relu(self.bn1(self.conv1(x)))
            h = self.bn2(self.conv2(h))
            skip = x if self.downsample is None else self.downsample(x)
            return F.relu(h + skip)

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            layers, cin = [], 64
            for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
                layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
                cin = cout
            self.backbone = nn.Sequential(*layers)
            self.fc = nn.Linear(512, CLASSES)

        def features(self, x):
            x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
            return self.backbone(x).mean((2, 3))

        def forward(self, x):
            return self.fc(self.features(x))

    class SameConvBn(nn.Module):
        """Convolution with TensorFlow SAME padding, then BatchNorm (eps 1e-3)."""

        def __init__(self, cin, cout, k, stride=1, groups=1):
            super().__init__()
            self.k, self.stride = k, stride
            self.conv = nn.Conv2d(cin, cout, k, stride, 0, groups=groups, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=1e-3)

        def forward(self, x):
            pads = []
            for size in (x.shape[3], x.shape[2]):
                total = max((-(-size // self.stride) - 1) * self.stride + self.k - size, 0)
                pads += [total // 2, total - total // 2]
            return self.bn(self.conv(F.pad(x, pads)))

    class MBConv(nn.Module):
        def __init__(self, cin, cout, k, stride, expand):
            super().__init__()
            mid = cin * expand
            self.expand = SameConvBn(cin, mid, 1) if expand != 1 else None
            self.depthwise = SameConvBn(mid, mid, k, stride, groups=mid)
            self.project = SameConvBn(mid, cout, 1)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            h = x if self.expand is None else F.relu6(self.expand(x))
            h = self.project(F.relu6(self.depthwise(h)))
            return h + x if self.residual else h

    class EfficientNetLite0(nn.Module):
        STAGES = [  # repeats, kernel, stride, expand, in, out
            (1, 3, 1, 1, 32, 16),
            (2, 3, 2, 6, 16, 24),
            (2, 5, 2, 6, 24, 40),
            (3, 3, 2, 6, 40, 80),
            (3, 5, 1, 6, 80, 112),
            (4, 5, 2, 6, 112, 192),
            (1, 3, 1, 6, 192, 320),
        ]

        def __init__(self):
            super().__init__()
            self.stem = SameConvBn(3, 32, 3, 2)
            blocks = []
            for repeats, k, s, e, cin, cout in self.STAGES:
                for i in range(repeats):
                    blocks.append(MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
            self.blocks = nn.Sequential(*blocks)
            self.top = SameConvBn(320, 1280, 1)
            self.dropout = nn.Dropout(0.2)
            self.fc = nn.Linear(1280, CLASSES)

        def features(self, x):
            h = self.blocks(F.relu6(self.stem(x)))
            return F.relu6(self.top(h)).mean((2, 3))

        def forward(self, x):
            return self.fc(self.dropout(self.features(x)))

    if model.startswith(("convnext", "efficientnet_b", "mobilenetv3", "vit_")):
        import timm  # timm's own model, random init (the weights do not change the speed)

        # ViT at 128 pixels: the position embeddings resampled, as graft does.
        extra = dict(dynamic_img_size=True) if model.startswith("vit_") else {}
        net = timm.create_model(model, pretrained=False, num_classes=CLASSES, **extra)
        net.fc = net.get_classifier()  # the head `frozen` mode trains
        return net
    return ResNet18() if model == "resnet18" else EfficientNetLite0()


def peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024)
    except OSError:
        return None


def run_one(model_name, size, mode, batch, iters):
    import contextlib

    import torch
    import torch.nn.functional as F

    setting = os.environ.get("GRAFT_BENCH_SETTING", "nchw")
    if setting not in ("nchw", "channels_last", "channels_last_bf16"):
        raise SystemExit(f"GRAFT_BENCH_SETTING={setting!r} is not nchw, channels_last or channels_last_bf16")
    torch.manual_seed(0)
    # GRAFT_BENCH_DEVICE (default cpu), as for graft's bench; on CUDA each timed batch ends with a synchronize.
    device = torch.device(os.environ.get("GRAFT_BENCH_DEVICE", "cpu"))
    model = build(model_name).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.tensor([i * 37 % CLASSES for i in range(batch)], device=device)
    if setting.startswith("channels_last"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if setting.endswith("bf16"):
        cast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        cast = contextlib.nullcontext
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if mode == "forward":
        model.eval()

        def step():
            with torch.no_grad(), cast():
                model(x)

    elif mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            with cast():
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

    elif mode == "frozen":
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        head = model.fc
        head.train()
        for p in head.parameters():
            p.requires_grad_(True)
        opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            with cast():
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

    else:
        raise SystemExit(f"mode {mode!r} is not one of {MODES}")
    step()  # warm-up
    sync()
    times = []
    for _ in range(max(iters, 1)):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    print(
        json.dumps(
            {
                "framework": "pytorch" if setting == "nchw" else f"pytorch-{setting}",
                "setting": setting,
                "model": model_name,
                "size": size,
                "batch": batch,
                "mode": mode,
                "device": str(device),
                "images_per_s": round(batch / median, 1),
                "ms_per_batch": round(median * 1e3, 1),
                "peak_rss_mib": peak_rss_mib(),
                "iters": len(times),
                "threads": torch.get_num_threads(),
                "version": torch.__version__,
            }
        ),
        flush=True,
    )


def main(args):
    if "--one" in args:
        i = args.index("--one")
        model, size, mode, batch, iters = args[i + 1 : i + 6]
        run_one(model, int(size), mode, int(batch), int(iters))
        return
    batch = int(os.environ.get("GRAFT_BENCH_BATCH", 16))
    iters = int(os.environ.get("GRAFT_BENCH_ITERS", 5))
    filters = [a for a in args if not a.startswith("-")]

    def keep(s):
        return not filters or s in filters

    for model in filter(keep, MODELS):
        for size in (s for s in SIZES if keep(str(s))):
            for mode in filter(keep, MODES):
                cmd = [sys.executable, __file__, "--one", model, str(size), mode, str(batch), str(iters)]
                subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main(sys.argv[1:])
