#!/usr/bin/env python3
"""Golden cases for graft's timm-layout architectures (tests/timm_golden.rs), made with timm itself.

    python scripts/timm-golden.py [--out tests/fixtures/timm] [--cases NAME ...]

Needs torch, timm and safetensors (a throwaway venv: `pip install torch timm safetensors`); CI never runs it.

For each reduced case (timm's own class with small depths and widths, so the repository stays small; the ViT
cases also at input sizes whose position embeddings timm resamples; random init, then every LayerNorm/BatchNorm
affine, BatchNorm statistic, layer scale, bias, class token and position embedding randomised so none is at
its trivial value), writes CASE.safetensors with:
  weights.<key>           the state_dict (float32, without num_batches_tracked), in timm's key layout, new
                          num_classes-way head;
  input [2,3,S,S], targets (int64);
  f64.<name>              the reference in float64 (the same weights in double precision): eval outputs per
                          layer group (the case's `groups`: stem, stage1..N, then ConvNeXt's features =
                          pooled + head.norm or EfficientNet/MobileNetV3's top; ViT's embed, blocks1..K,
                          features = the class token after the final norm), the pooled features, logits,
                          the train-mode logits and loss (cross-entropy, mean), grad.<key> of every parameter
                          and after_train.<bn>.running_mean/var (the BatchNorm statistics after that forward);
and CASE.json with the tolerances: for each quantity, tolerance_l2 bounds ||graft - reference||_2 by
max(10 x the L2 error of timm's own float32 run against its float64 run, 1e-5 x ||reference||), so the bound
is set by float32's error, not guessed (norm_l2 gives ||reference|| for the report).
Also writes keys.json: for every full-size architecture (convnext_atto .. convnext_small, efficientnet_b0 ..
b3, mobilenetv3_large/small_100, vit/deit_small_patch16_224), each state_dict key and shape of timm's model
with its 1000-way head (num_batches_tracked included, as timm saves it), for the strict-load test.
"""
import argparse
import copy
import json
import os

import torch
import torch.nn.functional as F
import timm
from safetensors.torch import save_file

from timm.models.efficientnet import _gen_efficientnet
from timm.models.mobilenetv3 import _gen_mobilenet_v3

# name: (graft's description of the network, input size, classes). `graft` is what tests/timm_golden.rs builds:
# ConvNeXt from depths/dims, EfficientNet from timm's channel/depth multipliers, MobileNetV3 from the channel
# multiplier (its 1280-wide head convolution narrowed to `head_channels` to keep the file small).
CASES = {
    "convnext_reduced": (dict(family="convnext", model_name="convnext_tiny", depths=[1, 1, 2, 1],
                              dims=[8, 16, 24, 32]), 64, 5),
    "convnext_reduced_convmlp": (dict(family="convnext", model_name="convnext_atto", depths=[1, 2, 1, 1],
                                      dims=[8, 16, 16, 24]), 64, 5),
    "efficientnet_reduced": (dict(family="efficientnet", model_name="efficientnet_b0", width=0.25, depth=0.5),
                             64, 5),
    "mobilenetv3_large_reduced": (dict(family="mobilenetv3", model_name="mobilenetv3_large_100", large=True,
                                       width=0.25, head_channels=64), 64, 5),
    "mobilenetv3_small_reduced": (dict(family="mobilenetv3", model_name="mobilenetv3_small_100", large=False,
                                       width=0.25, head_channels=48), 64, 5),
    # The Vision Transformer at its own size, then fed other sizes than its position embeddings were made
    # for (timm's dynamic_img_size: the grid resampled bicubically, antialiased, on every forward): 32-pixel
    # embeddings (4x4) for 48-pixel images (6x6), and 48-pixel ones for 32-pixel images.
    "vit_reduced": (dict(family="vit", model_name="vit_small_patch16_224", patch=8, embed_dim=32, depth=2,
                         heads=2, mlp_ratio=4.0, img_size=32, block_groups=2), 32, 5),
    "vit_reduced_upsampled": (dict(family="vit", model_name="vit_small_patch16_224", patch=8, embed_dim=32,
                                   depth=2, heads=2, mlp_ratio=4.0, img_size=32, block_groups=2), 48, 5),
    "vit_reduced_downsampled": (dict(family="vit", model_name="vit_small_patch16_224", patch=8, embed_dim=32,
                                     depth=2, heads=2, mlp_ratio=4.0, img_size=48, block_groups=2), 32, 5),
}
FULL = ["convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny", "convnext_small",
        "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "mobilenetv3_large_100",
        "mobilenetv3_small_100", "vit_small_patch16_224", "deit_small_patch16_224"]


def build(graft, classes):
    family, name = graft["family"], graft["model_name"]
    if family == "vit":
        return timm.models.vision_transformer.VisionTransformer(
            img_size=graft["img_size"], patch_size=graft["patch"], embed_dim=graft["embed_dim"],
            depth=graft["depth"], num_heads=graft["heads"], mlp_ratio=graft["mlp_ratio"], num_classes=classes,
            dynamic_img_size=True)
    if family == "convnext":
        return timm.create_model(name, pretrained=False, num_classes=classes, depths=graft["depths"],
                                 dims=graft["dims"])
    if family == "efficientnet":
        return _gen_efficientnet(name, graft["width"], graft["depth"], num_classes=classes, drop_rate=0.0)
    model = _gen_mobilenet_v3(name, graft["width"], num_classes=classes, drop_rate=0.0)
    model.conv_head = torch.nn.Conv2d(model.conv_head.in_channels, graft["head_channels"], 1, bias=True)
    model.classifier = torch.nn.Linear(graft["head_channels"], classes)
    return model


def groups(model, x):
    """Each of graft's layer groups in order (ending at the feature vector), then features and logits."""
    out = {}
    if hasattr(model, "cls_token"):  # ViT: embed, the blocks in runs of len(blocks) / block_groups, norm
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        out["embed"] = h
        runs = model.block_groups
        depth = len(model.blocks)
        for g in range(runs):
            for b in range(g * depth // runs, (g + 1) * depth // runs):
                h = model.blocks[b](h)
            out[f"blocks{g + 1}"] = h
        out["features"] = model.norm(h)[:, 0]
        out["logits"] = model.head(out["features"])
        return out
    if hasattr(model, "stages"):  # ConvNeXt
        h = model.stem(x)
        out["stem"] = h
        for i, s in enumerate(model.stages):
            h = s(h)
            out[f"stage{i + 1}"] = h
        h = model.head.global_pool(h)
        h = model.head.norm(h)
        out["features"] = h.flatten(1)
        out["logits"] = model.head.fc(out["features"])
        return out
    h = model.bn1(model.conv_stem(x))
    out["stem"] = h
    for i, s in enumerate(model.blocks):
        h = s(h)
        out[f"stage{i + 1}"] = h
    if hasattr(model, "bn2"):  # EfficientNet: conv_head -> bn2 (+act), then the pool
        h = model.bn2(model.conv_head(h))
        out["top"] = h
        out["features"] = model.global_pool(h)
    else:  # MobileNetV3: the pool, then conv_head (+bias) -> act
        h = model.act2(model.conv_head(model.global_pool(h)))
        out["top"] = h.flatten(1)
        out["features"] = out["top"].clone()
    out["logits"] = model.classifier(out["features"])
    return out


def randomise(model):
    """No affine, layer scale, bias or BatchNorm statistic left at its trivial value, so mistakes show."""
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k in ("cls_token", "pos_embed"):
                p.copy_(0.5 * torch.randn_like(p))
            elif k.endswith("gamma"):
                p.copy_(0.5 + 0.2 * torch.randn_like(p))
            elif "norm" in k or k.startswith("stem.1") or "downsample.0" in k or ".bn" in k or k[:3] == "bn1" \
                    or k[:3] == "bn2":
                p.copy_((1.0 if k.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif k.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
        for k, b in model.named_buffers():
            if k.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif k.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))


def run(model, x, y):
    model.eval()
    with torch.no_grad():
        ev = groups(model, x)
    assert torch.allclose(ev["logits"], model(x), rtol=1e-5, atol=1e-6)
    model.train()
    model.zero_grad()
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    res = {k: v.detach() for k, v in ev.items()}
    res["train_logits"] = logits.detach()
    res["loss"] = loss.detach().reshape(1)
    for k, p in model.named_parameters():
        res[f"grad.{k}"] = p.grad.detach().clone()
    for k, b in model.named_buffers():
        if k.endswith("running_mean") or k.endswith("running_var"):
            res[f"after_train.{k}"] = b.detach().clone()
    return res


def err(a, b):
    return (a.double() - b.double()).norm().item()


def tolerance(r32, r64):
    """The bound on ||graft - timm_f64||_2: ten times timm's own float32 error, at least 1e-5 of the norm.

    Absolute rather than relative, because some references are zero in exact arithmetic (the gradient of
    a BatchNorm bias whose output only ever reaches train-mode BatchNorms, which subtract it again): there
    float32 leaves rounding noise, and any relative bound is meaningless."""
    return max(10 * err(r32, r64), 1e-5 * r64.double().norm().item(), 1e-30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                                  "fixtures", "timm"))
    ap.add_argument("--cases", nargs="*", default=list(CASES),
                    help="only these cases (keys.json is always written)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(2)
    for name, (graft, size, classes) in CASES.items():
        if name not in args.cases:
            continue
        torch.manual_seed(0)
        model = build(graft, classes)
        if graft["family"] == "vit":
            model.block_groups = graft["block_groups"]
        randomise(model)
        # Weights as they are before any train-mode forward moves the BatchNorm statistics.
        tensors = {f"weights.{k}": v.clone().contiguous() for k, v in model.state_dict().items()
                   if not k.endswith("num_batches_tracked")}
        m64 = copy.deepcopy(model).double()
        x = torch.randn(2, 3, size, size)
        y = torch.tensor([1, classes - 1])
        ev = groups(model.eval(), x)
        r32 = run(model, x, y)
        r64 = run(m64, x.double(), y)
        tol = {k: tolerance(r32[k], r64[k]) for k in r64}
        tensors["input"] = x
        tensors["targets"] = y
        for k, v in r64.items():
            tensors[f"f64.{k}"] = v.contiguous()
        save_file(tensors, os.path.join(args.out, f"{name}.safetensors"))
        graft = dict(graft)
        if graft["family"] == "convnext":
            graft["conv_mlp"] = bool(model.stages[0].blocks[0].use_conv_mlp)
        case = {"timm": timm.__version__, "torch": torch.__version__, "graft": graft, "input_size": size,
                "groups": [k for k in ev if k not in ("logits",) and not (k == "features" and "top" in ev)],
                "num_classes": classes, "tolerance_l2": tol,
                "norm_l2": {k: v.double().norm().item() for k, v in r64.items()}}
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(case, f, indent=1, sort_keys=True)
        worst = max(tol.items(), key=lambda kv: kv[1] / max(case["norm_l2"][kv[0]], 1e-300))
        print(name, "tensors", len(tensors), "loosest tolerance (abs, norm)", worst, case["norm_l2"][worst[0]])
    keys = {}
    for n in FULL:
        model = timm.create_model(n, pretrained=False)
        sd = model.state_dict()
        keys[n] = {k: list(v.shape) for k, v in sd.items()}
        print(n, sum(p.numel() for p in model.parameters()), "parameters,", len(sd), "state keys")
    with open(os.path.join(args.out, "keys.json"), "w") as f:
        json.dump({"timm": timm.__version__, "models": keys}, f)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
