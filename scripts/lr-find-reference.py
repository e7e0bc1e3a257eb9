#!/usr/bin/env python3
"""Reference suggestions of fastai's learning-rate finder, for tests/fixtures/lr_find_reference.json.

The four rules below are fastai's (fastai/callback/schedule.py, 2.7), with torch tensors replaced by numpy
arrays of float64; the trimming is `Learner.lr_find`'s. Run with any Python that has numpy:
    python3 -m venv /tmp/np && /tmp/np/bin/pip install numpy
    /tmp/np/bin/python scripts/lr-find-reference.py > tests/fixtures/lr_find_reference.json
"""
import json
import numpy as np


def valley(lrs, losses, num_it):
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx]), (float(lrs[idx]), float(losses[idx]))


def slide(lrs, losses, num_it, lr_diff=15, thresh=.005, adjust_value=1.):
    loss_grad = np.gradient(losses)
    r_idx = -1
    l_idx = r_idx - lr_diff
    local_min_lr = lrs[l_idx]
    while (l_idx >= -len(losses)) and (abs(loss_grad[r_idx] - loss_grad[l_idx]) > thresh):
        local_min_lr = lrs[l_idx]
        r_idx -= 1
        l_idx -= 1
    suggestion = float(local_min_lr) * adjust_value
    idx = np.interp(np.log10(suggestion), np.log10(lrs), losses)
    return suggestion, (suggestion, float(idx))


def minimum(lrs, losses, num_it):
    lr_min = lrs[losses.argmin()].item()
    loss_idx = losses[min(range(len(lrs)), key=lambda i: abs(lrs[i] - lr_min))]
    return lr_min / 10, (lr_min, float(loss_idx))


def steep(lrs, losses, num_it):
    grads = (losses[1:] - losses[:-1]) / (np.log(lrs[1:]) - np.log(lrs[:-1]))
    lr_steep = lrs[1:][grads.argmin()].item()
    idx = losses[min(range(len(lrs)), key=lambda i: abs(lrs[i] - lr_steep))]
    return lr_steep, (lr_steep, float(idx))


def smoothed(raw, beta=0.98):
    out, val = [], 0.0
    for k, x in enumerate(raw, 1):
        val = x + beta * (val - x)  # torch.lerp(x, val, beta)
        out.append(val / (1 - beta ** k))
    return out


def case(name, raw, num_it=100, start=1e-7, end=10.0):
    n = len(raw)
    lrs = [start * (end / start) ** (i / num_it) for i in range(n)]
    losses = smoothed(raw)
    lo = num_it // 10
    l, s = np.array(lrs[lo:-5]), np.array(losses[lo:-5])
    nan = np.nonzero(np.isnan(s))[0]
    if len(nan):
        l, s = l[:nan[0]], s[:nan[0]]
    sug = {f.__name__: f(l, s, num_it) for f in (valley, slide, minimum, steep)}
    clean = lambda v: [None if np.isnan(x) else x for x in v]  # JSON has no NaN
    return {"name": name, "raw": clean(raw), "num_it": num_it, "lrs": lrs, "losses": clean(losses),
            "suggestions": {k: [v[0], list(v[1])] for k, v in sug.items()}}


rng = np.random.default_rng(0)
x = np.log10([1e-7 * 1e8 ** (i / 100) for i in range(100)])
bowl = 1.0 + 1.3 / (1 + np.exp(3 * (x + 3.5))) + 0.4 * np.maximum(x + 2, 0) ** 2
cases = [
    case("bowl", bowl.tolist()),
    case("noisy bowl", (bowl + rng.normal(0, 0.05, 100)).tolist()),
    case("diverges at step 70", (bowl[:70] * np.r_[np.ones(60), np.linspace(1, 8, 10)]).tolist()),
    case("with a nan", bowl[:80].tolist()[:75] + [float("nan")] * 5),
]
print(json.dumps(cases))
