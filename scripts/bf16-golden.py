#!/usr/bin/env python3
"""PyTorch's own bf16 error on the ResNet golden cases, the yardstick of tests/bf16_golden.rs.

    python scripts/bf16-golden.py [--golden ../shared/golden] [--out tests/fixtures/bf16_pytorch_error.json]

Needs torch and torchvision (a throwaway venv: `pip install torch torchvision safetensors`); CI never runs it.

For every case under GOLDEN/models/*/case.json (torchvision ResNets), reruns the case's eval and train passes
in float32 under `torch.autocast("cpu", dtype=torch.bfloat16)` (PyTorch's mixed precision on the CPU: bf16
convolutions and matrix products through oneDNN) and writes, per quantity, the relative L2 error
||autocast - reference|| / ||reference|| against the case's float32 references (bf16's error is thousands of
times float32's, so the float32 reference is exact enough): eval.<output> for the case's eval outputs,
train.logits, train.loss, grad.<param> for its gradients. graft's `--precision bf16` must stay within a small
multiple of these (graft keeps the activations between layers in f32, PyTorch's autocast keeps them in bf16,
so graft's error is expected below PyTorch's).
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file


def rel_l2(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def case_errors(d, case):
    weights = load_file(os.path.join(d, case["weights"]))
    net = getattr(torchvision.models, case["arch"])(num_classes=weights["fc.weight"].shape[0])
    net.load_state_dict(weights)
    out = {}
    ev = load_file(os.path.join(d, case["eval"]["file"]))
    net.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        x = ev["input"]
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        outs = {"stem": h}
        for name in ["layer1", "layer2", "layer3", "layer4"]:
            h = getattr(net, name)(h)
            outs[name] = h
        outs["features"] = torch.flatten(net.avgpool(h), 1)
        outs["logits"] = net.fc(outs["features"])
    for name in case["eval"]["outputs"]:
        out[f"eval.{name}"] = rel_l2(outs[name].float(), ev[name])
    tr = load_file(os.path.join(d, case["train"]["file"]))
    net.load_state_dict(weights)
    net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(tr["input"])
        loss = F.cross_entropy(logits, tr["targets"])
    loss.backward()
    out["train.logits"] = rel_l2(logits.float(), tr["logits"])
    out["train.loss"] = rel_l2(loss.float().reshape(()), tr["loss"].reshape(()))
    params = dict(net.named_parameters())
    for name in case["train"]["grads"]:
        out[f"grad.{name}"] = rel_l2(params[name].grad, tr[f"grad.{name}"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--golden", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "golden"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                                  "bf16_pytorch_error.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    models = os.path.join(args.golden, "models")
    result = {"made_with": f"torch {torch.__version__}, CPU autocast bfloat16", "cases": {}}
    for name in sorted(os.listdir(models)):
        path = os.path.join(models, name, "case.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            case = json.load(f)
        result["cases"][name] = case_errors(os.path.join(models, name), case)
        print(name, json.dumps(result["cases"][name], indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
