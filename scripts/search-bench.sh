#!/usr/bin/env bash
# graft's samplers beside Optuna's (GPSampler, TPESampler, RandomSampler) on branin, hartmann6 and mixed,
# 20 seeds each; JSON lines to $OUT (default search-bench.jsonl), then a table of medians.
# Optuna goes into a throwaway venv ($VENV, default /tmp/graft-optuna-venv): optuna, scipy and torch
# (GPSampler needs both) from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/graft-optuna-venv}
OUT=${OUT:-search-bench.jsonl}
SEEDS=${SEEDS:-20}
if ! "$VENV/bin/python" -c "import optuna, scipy, torch" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q optuna scipy torch
fi
cargo build --release --example search_bench
: > "$OUT"
for f in branin hartmann6 mixed; do
    for s in random bayes; do
        target/release/examples/search_bench --function "$f" --sampler "$s" --seeds "$SEEDS" | tee -a "$OUT"
    done
    for s in random tpe gp; do
        "$VENV/bin/python" scripts/search-bench-optuna.py --function "$f" --sampler "$s" --seeds "$SEEDS" | tee -a "$OUT"
    done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys, collections
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs[(r["function"], r["sampler"])].append(r)
print("| function | sampler | trials | median best | mean s/seed |")
print("|---|---|---|---|---|")
for (f, s), rs in runs.items():
    print(f"| {f} | {s} | {rs[0]['trials']} | {statistics.median(r['best'] for r in rs):.4f} | "
          f"{statistics.mean(r['seconds'] for r in rs):.2f} |")
PY
