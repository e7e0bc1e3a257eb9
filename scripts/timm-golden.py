#!/usr/bin/env python3
"""Golden cases for graft's timm-layout architectures (tests/timm_golden.rs), made with timm itself.

    python scripts/timm-golden.py [--out tests/fixtures/timm]

Needs torch, timm and safetensors (a throwaway venv: `pip install torch timm safetensors`); CI never runs it.

For each reduced case (timm's own class with small depths and widths, so the repository stays small; random
init, then every LayerNorm affine, layer scale and bias randomised so none is at its trivial value), writes
CASE.safetensors with:
  weights.<key>           the state_dict (float32), in timm's key layout, new num_classes-way head;
  input [2,3,S,S], targets (int64);
  f64.<name>              the reference in float64 (the same weights in double precision): eval outputs per
                          group (stem, stage1..4, features = pooled + head.norm), logits, the train-mode loss
                          (cross-entropy, mean) and grad.<key> of every parameter;
and CASE.json with the tolerances: for each quantity, max_rel_l2 = max(1e-5, 10 x the relative L2 error of
timm's own float32 run against its float64 run), so the bound is set by float32's error, not guessed.
Also writes keys.json: for every full-size architecture (convnext_atto .. convnext_small), each state_dict
key and shape of timm's model with its 1000-way head, for the strict-load test.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
import timm
from safetensors.torch import save_file

CASES = {
    # name: (timm constructor kwargs, input size, classes)
    "convnext_reduced": (dict(model_name="convnext_tiny", depths=(1, 1, 2, 1), dims=(8, 16, 24, 32)), 64, 5),
    "convnext_reduced_convmlp": (dict(model_name="convnext_atto", depths=(1, 2, 1, 1), dims=(8, 16, 16, 24)), 64, 5),
}
FULL = ["convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny", "convnext_small"]


def groups(model, x):
    out = {}
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
    return res


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                                  "fixtures", "timm"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(2)
    for name, (kw, size, classes) in CASES.items():
        torch.manual_seed(0)
        kw = dict(kw)
        model = timm.create_model(kw.pop("model_name"), pretrained=False, num_classes=classes, **kw)
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k.endswith("gamma"):
                    p.copy_(0.5 + 0.2 * torch.randn_like(p))
                elif "norm" in k or k.startswith("stem.1") or "downsample.0" in k:
                    p.copy_((1.0 if k.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
                elif k.endswith("bias"):
                    p.copy_(0.05 * torch.randn_like(p))
        x = torch.randn(2, 3, size, size)
        y = torch.tensor([1, classes - 1])
        r32 = run(model, x, y)
        m64 = model.double()
        r64 = run(m64, x.double(), y)
        model.float()
        tol = {k: max(1e-5, 10 * rel(r32[k], r64[k])) for k in r64}
        tensors = {f"weights.{k}": v.float().contiguous() for k, v in model.state_dict().items()}
        tensors["input"] = x
        tensors["targets"] = y
        for k, v in r64.items():
            tensors[f"f64.{k}"] = v.contiguous()
        save_file(tensors, os.path.join(args.out, f"{name}.safetensors"))
        case = {"timm": timm.__version__, "torch": torch.__version__, "arch_kwargs": {k: list(v) for k, v in kw.items()},
                "conv_mlp": bool(model.stages[0].blocks[0].use_conv_mlp), "input_size": size,
                "num_classes": classes, "tolerance_max_rel_l2": tol}
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(case, f, indent=1, sort_keys=True)
        worst = max(tol.items(), key=lambda kv: kv[1])
        print(name, "tensors", len(tensors), "worst tolerance", worst)
    keys = {}
    for n in FULL:
        sd = timm.create_model(n, pretrained=False).state_dict()
        keys[n] = {k: list(v.shape) for k, v in sd.items()}
    with open(os.path.join(args.out, "keys.json"), "w") as f:
        json.dump({"timm": timm.__version__, "models": keys}, f)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
