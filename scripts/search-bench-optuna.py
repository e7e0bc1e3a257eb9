#!/usr/bin/env python3
"""Optuna's samplers on the same functions, spaces and seeds as examples/search_bench.rs, same JSON lines.

usage: search-bench-optuna.py --function branin|hartmann6|mixed --sampler gp|tpe|random [--trials N] [--seeds 20] [--first-seed 0]
"""
import argparse
import json
import math
import time

import optuna

optuna.logging.set_verbosity(optuna.logging.WARNING)

A = [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]]
P = [[0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886], [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
     [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650], [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381]]
ALPHA = [1.0, 1.2, 3.0, 3.2]


def branin(t):
    x1 = t.suggest_float("x1", -5.0, 10.0)
    x2 = t.suggest_float("x2", 0.0, 15.0)
    b, c = 5.1 / (4 * math.pi ** 2), 5 / math.pi
    return (x2 - b * x1 * x1 + c * x1 - 6) ** 2 + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x1) + 10


def hartmann6(t):
    x = [t.suggest_float(f"x{i}", 0.0, 1.0) for i in range(6)]
    return -sum(ALPHA[i] * math.exp(-sum(A[i][j] * (x[j] - P[i][j]) ** 2 for j in range(6))) for i in range(4))


def mixed(t):
    opt = t.suggest_categorical("opt", ["adam", "sgd", "rmsprop"])
    lr = t.suggest_float("lr", 1e-5, 1.0, log=True)
    x = t.suggest_float("x", 0.0, 1.0)
    n = t.suggest_int("n", 1, 8)
    centre, offset = {"adam": (-3.0, 0.3), "sgd": (-1.5, 0.0), "rmsprop": (-2.5, 0.5)}[opt]
    f = offset + (math.log10(lr) - centre) ** 2 / 4 + (x - 0.7) ** 2 + 0.05 * (n - 3) ** 2
    if opt == "sgd":
        f += 2 * (t.suggest_float("momentum", 0.0, 1.0) - 0.9) ** 2
    return f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--function", default="branin")
    ap.add_argument("--sampler", default="gp")
    ap.add_argument("--trials", type=int)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=0)
    a = ap.parse_args()
    f = {"branin": branin, "hartmann6": hartmann6, "mixed": mixed}[a.function]
    trials = a.trials or (50 if a.function == "hartmann6" else 30)
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        sampler = {
            "gp": lambda: optuna.samplers.GPSampler(seed=seed),
            "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        }[a.sampler]()
        study = optuna.create_study(sampler=sampler)
        t0 = time.time()
        study.optimize(f, n_trials=trials)
        print(json.dumps({"function": a.function, "sampler": "optuna-" + a.sampler, "seed": seed,
                          "trials": trials, "best": study.best_value,
                          "seconds": round(time.time() - t0, 3)}), flush=True)


if __name__ == "__main__":
    main()
