#!/usr/bin/env bash
# graft beside PyTorch on this machine's CPU, in one run: images/s and peak memory of inference forward,
# full training step and frozen-backbone step, ResNet-18, EfficientNet-Lite0, EfficientNet-B0,
# MobileNetV3-Large, ConvNeXt-Atto and ConvNeXt-Tiny (timm's model on the PyTorch side for the last four; needs
# timm beside torch) at 128 and 224, batch 16.
#
#   scripts/bench.sh                 # everything; JSON lines to bench-results.jsonl, then the table
#   scripts/bench.sh resnet18 224    # filters, as for `cargo bench --bench train_step`
#
# Each configuration runs graft in f32 and `--precision bf16` (GRAFT_BENCH_PRECISIONS) and PyTorch in its
# three CPU settings (GRAFT_BENCH_SETTINGS: nchw, channels_last, channels_last_bf16).
#
# The two frameworks run alternately, configuration by configuration, each in a fresh process, so a change of
# load on a shared machine hits both alike. PyTorch runs only when `python3 -c 'import torch'` works; without
# it the table shows graft alone. GRAFT_BENCH_BATCH / GRAFT_BENCH_ITERS change batch size and timed batches.
#
# PyTorch runs with OMP_WAIT_POLICY=PASSIVE unless the variable is set: with OpenMP's default spin-waiting, on a
# machine whose cores are shared with other work, PyTorch's throughput collapses (ResNet-18 forward at 128 under
# a load average of 4 on 2 cores: 13.8 images/s spinning, 66.0 passive), and the table would compare schedulers
# instead of kernels. (The two policies have not been compared on an idle machine.)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
set -euo pipefail
cd "$(dirname "$0")/.."
out="${GRAFT_BENCH_OUT:-bench-results.jsonl}"
: > "$out"
have_torch=0
python3 -c 'import torch' 2>/dev/null && have_torch=1
# Build once, then run the binary itself: editing the sources during a run cannot change what is measured.
exe=$(cargo bench --bench train_step --no-run --message-format=json -q |
  python3 -c 'import json, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("executable") and m.get("target", {}).get("name") == "train_step":
        print(m["executable"])')
echo "# $(uptime)" >&2
filters=("$@")
# graft's precisions and PyTorch's settings (see scripts/bench-pytorch.py), each a column of the table.
graft_precisions="${GRAFT_BENCH_PRECISIONS:-f32 bf16}"
torch_settings="${GRAFT_BENCH_SETTINGS:-nchw channels_last channels_last_bf16}"
for model in resnet18 efficientnet_lite0 efficientnet_b0 mobilenetv3_large_100 convnext_atto convnext_tiny vit_small_patch16_224; do
  for size in 128 224; do
    for mode in forward train frozen; do
      # A configuration runs when every filter names one of its model, size or mode.
      skip=0
      for f in "${filters[@]+"${filters[@]}"}"; do
        [ "$f" = "$model" ] || [ "$f" = "$size" ] || [ "$f" = "$mode" ] || skip=1
      done
      [ $skip -eq 1 ] && continue
      for precision in $graft_precisions; do
        GRAFT_BENCH_PRECISION=$precision "$exe" --bench "$model" "$size" "$mode" | tee -a "$out"
      done
      if [ $have_torch -eq 1 ]; then
        for setting in $torch_settings; do
          GRAFT_BENCH_SETTING=$setting python3 scripts/bench-pytorch.py "$model" "$size" "$mode" 2>/dev/null | tee -a "$out"
        done
      fi
    done
  done
done
echo "# $(uptime)" >&2
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault((r["model"], r["size"], r["mode"]), {})[r["framework"]] = r
cols = [("graft", "graft f32"), ("graft-bf16", "graft bf16"), ("pytorch", "PyTorch NCHW"),
        ("pytorch-channels_last", "PyTorch channels_last"), ("pytorch-channels_last_bf16", "PyTorch CL + bf16")]
cols = [c for c in cols if any(c[0] in fw for fw in by.values())]
ips = lambda fw, k: fw.get(k, {}).get("images_per_s")
def ratio(fw, a, b):
    x, y = ips(fw, a), ips(fw, b)
    return f"{x / y:.2f}" if x and y else "-"
print()
print("| model | size | mode | " + " | ".join(f"{name} img/s" for _, name in cols)
      + " | f32 / NCHW | f32 / CL | bf16 / CL+bf16 | " + " | ".join(f"{name} peak MiB" for _, name in cols) + " |")
print("|---" * (3 + 2 * len(cols) + 3) + "|")
for (model, size, mode), fw in by.items():
    cell = lambda k, f: str(fw[k][f]) if k in fw and fw[k].get(f) is not None else "-"
    print(f"| {model} | {size} | {mode} | " + " | ".join(cell(k, "images_per_s") for k, _ in cols)
          + f" | {ratio(fw, 'graft', 'pytorch')} | {ratio(fw, 'graft', 'pytorch-channels_last')}"
          + f" | {ratio(fw, 'graft-bf16', 'pytorch-channels_last_bf16')} | "
          + " | ".join(cell(k, "peak_rss_mib") for k, _ in cols) + " |")
PY
