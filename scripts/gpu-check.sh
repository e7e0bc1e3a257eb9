#!/usr/bin/env bash
# Proves graft's CUDA build on a machine with an NVIDIA GPU, in one run sized for about 15 minutes on 16
# cores (most of it the cold build; not yet timed on a GPU):
#
#   scripts/gpu-check.sh [--out DIR] [--inputs DIR] [--only STEP,..] [--skip STEP,..] [--dry-run]
#   scripts/gpu-check.sh --prepare DIR     # on a machine with internet: stage the inputs into DIR
#
# Steps, in order (each writes DIR/<step>.json and DIR/<step>.log; DIR/gpu-check.json sums them up):
#   env       what the machine has: nvidia-smi, nvcc, cargo, python3/torch
#   build     cargo build --release --features cuda (the binary and the GPU tests), toolkit as below
#   golden    the data-driven golden tests on the GPU: GRAFT_TEST_DEVICE=cuda cargo test --release
#             --features cuda --test resnet_golden --test optim_golden --test efficientnet_golden (tolerances:
#             tests/common/mod.rs, GPU_TOLERANCE_FACTOR)
#   finetune  EfficientNet-Lite0 on the Fashion-MNIST anchor data (README "Results on real data"), short: a
#             3-epoch linear probe and a 2-epoch full fine-tune, each on cuda and on cpu, evaluated on the
#             staged test images; records both accuracies and their difference
#   bench     benches/train_step.rs on cuda (GRAFT_BENCH_DEVICE=cuda), and scripts/bench-pytorch.py on cuda
#             when `import torch` works (skipped, not failed, when it does not)
#
# A step that cannot run for want of something (no GPU, no toolkit, no staged data, no torch) is recorded as
# "skipped" with the reason; a step whose command fails is "failed". Steps after a failed build are skipped.
# Exit status: 0 when no step failed.
#
# Nothing is downloaded when the inputs are there: the GPU machine may have no internet. The CUDA toolkit is
# nvcc on PATH (with CUDA_ROOT or CUDA_PATH), else the cache of scripts/cuda-toolkit.sh, else that script
# (needs PyPI). The inputs folder (--inputs, default gpu-check-inputs/ in the repository) holds what
# --prepare stages: fm/ (1,000 training and 1,000 test images, 96x96 RGB, seed 0) and cache/weights/
# (the converted EfficientNet-Lite0 weights). Cargo needs its crates (a registry cache or the network).
#
# Environment: OUT (default for --out), CARGO (default cargo), PYTHON (default python3),
# GRAFT_GPU_CHECK_DEVICE (default cuda; `cpu` runs the GPU steps on the CPU, to test this script),
# GRAFT_BIN (default target/release/graft, what the build step makes).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STEPS=(env build golden finetune bench)
CARGO=${CARGO:-cargo}
PYTHON=${PYTHON:-python3}
DEVICE=${GRAFT_GPU_CHECK_DEVICE:-cuda}
GRAFT_BIN=${GRAFT_BIN:-$ROOT/target/release/graft}
out=${OUT:-$ROOT/gpu-check-out}
inputs=$ROOT/gpu-check-inputs
dry_run=0
prepare=""
only=""
skip=""

usage() { sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --out) out=${2:?--out needs a folder}; shift 2 ;;
        --inputs) inputs=${2:?--inputs needs a folder}; shift 2 ;;
        --only) only=${2:?--only needs steps}; shift 2 ;;
        --skip) skip=${2:?--skip needs steps}; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --prepare) prepare=${2:?--prepare needs a folder}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu-check: unknown argument \`$1\` (see --help)" >&2; exit 2 ;;
    esac
done
for list in "$only" "$skip"; do
    for s in ${list//,/ }; do
        [[ " ${STEPS[*]} " == *" $s "* ]] || { echo "gpu-check: unknown step \`$s\`; steps: ${STEPS[*]}" >&2; exit 2; }
    done
done

if [[ -n "$prepare" ]]; then
    set -e
    mkdir -p "$prepare/cache/weights"
    "$ROOT/scripts/fashion-mnist.sh" "$prepare/fm" --per-class 100 --size 96 --rgb --seed 0 --test-per-class 100
    cache=${GRAFT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/graft}
    [[ -f "$cache/weights/efficientnet_lite0.safetensors" ]] || "$ROOT/scripts/fetch-efficientnet-lite0.sh"
    cp "$cache/weights/efficientnet_lite0.safetensors" "$prepare/cache/weights/"
    echo "gpu-check: inputs staged in $prepare ($(du -sh "$prepare" | cut -f1))"
    exit 0
fi

mkdir -p "$out" || { echo "gpu-check: cannot create $out" >&2; exit 2; }
out=$(cd "$out" && pwd)

# JSON string of $1 (quotes, backslashes and control characters escaped).
json_str() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\t'/\\t}
    s=${s//$'\r'/}
    printf '"%s"' "$s"
}

declare -A status reason
# record STEP STATUS SECONDS REASON [EXTRA_JSON_FIELDS]: writes $out/STEP.json.
record() {
    status[$1]=$2
    reason[$1]=$4
    printf '{"step": %s, "status": %s, "seconds": %s, "reason": %s, "log": %s%s}\n' \
        "$(json_str "$1")" "$(json_str "$2")" "$3" "$(json_str "$4")" "$(json_str "$1.log")" "${5:+, $5}" \
        >"$out/$1.json"
    echo "gpu-check: $1: $2${4:+ ($4)} in $3 s"
}

wanted() {
    [[ -z "$only" || ",$only," == *",$1,"* ]] && [[ ",$skip," != *",$1,"* ]]
}

describe() {
    case $1 in
        env) echo "record nvidia-smi, nvcc --version, cargo --version, python3/torch" ;;
        build) echo "$CARGO build --release --features cuda --bin graft; $CARGO test --release --features cuda --no-run (golden tests); $CARGO bench --features cuda --bench train_step --no-run" ;;
        golden) echo "GRAFT_TEST_DEVICE=$DEVICE $CARGO test --release --features cuda --test resnet_golden --test optim_golden --test efficientnet_golden" ;;
        finetune) echo "graft finetune efficientnet_lite0 on $inputs/fm (probe 3 epochs, full 2 epochs) on $DEVICE and cpu; graft eval --split test; compare accuracy" ;;
        bench) echo "train_step bench with GRAFT_BENCH_DEVICE=$DEVICE (resnet18, efficientnet_lite0 at 224); scripts/bench-pytorch.py on $DEVICE if torch imports" ;;
    esac
}

if [[ $dry_run -eq 1 ]]; then
    echo "gpu-check: dry run, results would go to $out"
    entries=()
    for s in "${STEPS[@]}"; do
        if wanted "$s"; then
            echo "step $s: $(describe "$s")"
            entries+=("{\"step\": $(json_str "$s"), \"status\": \"planned\", \"command\": $(json_str "$(describe "$s")")}")
        else
            echo "step $s: not selected"
        fi
    done
    (IFS=,; printf '{"dry_run": true, "device": %s, "steps": [%s]}\n' "$(json_str "$DEVICE")" "${entries[*]}") >"$out/gpu-check.json"
    exit 0
fi

# The CUDA toolkit for the build: one already installed, else the cached wheels, else fetch them.
toolkit() {
    if command -v nvcc >/dev/null && [[ -n "${CUDA_ROOT:-${CUDA_PATH:-}}" ]]; then
        export CUDA_ROOT=${CUDA_ROOT:-$CUDA_PATH}
    elif command -v nvcc >/dev/null && [[ -d /usr/local/cuda ]]; then
        export CUDA_ROOT=/usr/local/cuda
    else
        local env_lines
        env_lines=$("$ROOT/scripts/cuda-toolkit.sh") || return 1
        eval "$env_lines"
    fi
    # cudarc knows CUDA up to 13.4; a newer system toolkit is announced as 13.4.
    local v
    v=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    read -r major minor <<<"$v"
    if [[ -n "${major:-}" && -z "${CUDARC_CUDA_VERSION:-}" ]] && (( major * 1000 + minor * 10 > 13040 )); then
        export CUDARC_CUDA_VERSION=13040
    fi
    if [[ -z "${CUDA_COMPUTE_CAP:-}" ]] && command -v nvidia-smi >/dev/null; then
        CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
        export CUDA_COMPUTE_CAP
    fi
}

cd "$ROOT" || exit 2
export GRAFT_CACHE=${GRAFT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/graft}
[[ -d "$inputs/cache/weights" ]] && export GRAFT_CACHE=$inputs/cache
have_gpu=0
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && have_gpu=1

run_env() {
    {
        nvidia-smi || echo "no nvidia-smi"
        command -v nvcc && nvcc --version
        "$CARGO" --version
        "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' || echo "no torch"
    } >"$out/env.log" 2>&1
    local gpu
    gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
    record env ok 0 "" "\"gpu\": $(json_str "${gpu:-none}"), \"nproc\": $(nproc)"
}

run_build() {
    local t=$SECONDS
    if ! toolkit >"$out/build.log" 2>&1; then
        record build skipped $((SECONDS - t)) "no CUDA toolkit: no nvcc on PATH and scripts/cuda-toolkit.sh failed (PyPI unreachable?)"
        return
    fi
    echo "CUDA_ROOT=$CUDA_ROOT CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-} CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-}" >>"$out/build.log"
    if "$CARGO" build --release --features cuda --bin graft >>"$out/build.log" 2>&1 &&
        "$CARGO" test --release --features cuda --no-run --test resnet_golden --test optim_golden \
            --test efficientnet_golden >>"$out/build.log" 2>&1 &&
        "$CARGO" bench --features cuda --bench train_step --no-run >>"$out/build.log" 2>&1; then
        record build ok $((SECONDS - t)) ""
    else
        record build failed $((SECONDS - t)) "cargo failed, see build.log"
    fi
}

run_golden() {
    local t=$SECONDS
    if GRAFT_TEST_DEVICE=$DEVICE "$CARGO" test --release --features cuda --test resnet_golden --test optim_golden \
        --test efficientnet_golden -- --nocapture --test-threads 1 >"$out/golden.log" 2>&1; then
        record golden ok $((SECONDS - t)) ""
    else
        record golden failed $((SECONDS - t)) "a golden test failed on $DEVICE, see golden.log"
    fi
}

# accuracy RUN_NAME DEVICE FINETUNE_ARGS..: fine-tunes, exports, evaluates on the test split; prints the
# accuracy (a number) on stdout, the logs go to finetune.log.
accuracy() {
    local name=$1 dev=$2
    shift 2
    local run=$out/runs/$name-$dev exe=$GRAFT_BIN
    local C=(--base efficientnet_lite0 --data "$inputs/fm" --image-size 96 --crop-pct 1 --batch-size 32 --val-split 0
        --schedule constant --optimizer adam --lr-mult 1 --init torch --seed 0)
    rm -rf "$run"
    echo "== $name on $dev" >>"$out/finetune.log"
    "$exe" finetune "${C[@]}" "$@" --device "$dev" --run-dir "$run" >>"$out/finetune.log" 2>&1 || return 1
    "$exe" export "$run" --out "$run/model.safetensors" >>"$out/finetune.log" 2>&1 || return 1
    "$exe" eval --model "$run/model.safetensors" --data "$inputs/fm" --split test --json --device "$dev" \
        2>>"$out/finetune.log" | tee -a "$out/finetune.log" |
        sed -n 's/.*"accuracy": *\([0-9.eE+-]*\).*/\1/p' | head -1
}

run_finetune() {
    local t=$SECONDS
    if [[ ! -d "$inputs/fm/train" || ! -f "$GRAFT_CACHE/weights/efficientnet_lite0.safetensors" ]]; then
        record finetune skipped 0 "no staged inputs in $inputs (run scripts/gpu-check.sh --prepare $inputs where there is internet)"
        return
    fi
    : >"$out/finetune.log"
    local fields=() failed=0 name dev acc devices=("$DEVICE")
    [[ $DEVICE != cpu ]] && devices+=(cpu)
    for name in probe full; do
        local args=(--freeze-epochs 3 --epochs 0 --lr 1e-3)
        [[ $name == full ]] && args=(--freeze-epochs 0 --epochs 2 --lr 1e-4)
        local pair=()
        for dev in "${devices[@]}"; do
            local t0=$SECONDS
            acc=$(accuracy "$name" "$dev" "${args[@]}")
            if [[ -z "$acc" ]]; then
                failed=1
                acc=null
            fi
            fields+=("\"${name}_${dev//:/_}\": {\"test_accuracy\": $acc, \"seconds\": $((SECONDS - t0))}")
            pair+=("$acc")
        done
        if [[ ${#pair[@]} -eq 2 && ${pair[0]} != null && ${pair[1]} != null ]]; then
            fields+=("\"${name}_accuracy_gap\": $(awk -v a="${pair[0]}" -v b="${pair[1]}" 'BEGIN { d = a - b; if (d < 0) d = -d; print d }')")
        fi
    done
    local joined
    joined=$(IFS=,; echo "${fields[*]}")
    if [[ $failed -eq 0 ]]; then
        record finetune ok $((SECONDS - t)) "" "$joined"
    else
        record finetune failed $((SECONDS - t)) "a run failed, see finetune.log" "$joined"
    fi
}

run_bench() {
    local t=$SECONDS results=$out/bench.jsonl failed=0
    : >"$results"
    : >"$out/bench.log"
    local exe
    exe=$("$CARGO" bench --features cuda --bench train_step --no-run --message-format=json 2>>"$out/bench.log" |
        sed -n 's/.*"executable":"\([^"]*train_step[^"]*\)".*/\1/p' | tail -1)
    if [[ -z "$exe" ]]; then
        record bench failed $((SECONDS - t)) "cannot build benches/train_step.rs, see bench.log"
        return
    fi
    local have_torch=0
    GRAFT_BENCH_DEVICE=$DEVICE "$PYTHON" -c 'import os, torch; assert torch.cuda.is_available() or os.environ["GRAFT_BENCH_DEVICE"] == "cpu"' \
        >>"$out/bench.log" 2>&1 && have_torch=1
    for model in resnet18 efficientnet_lite0; do
        for mode in forward train frozen; do
            GRAFT_BENCH_DEVICE=$DEVICE GRAFT_BENCH_ITERS=${GRAFT_BENCH_ITERS:-10} "$exe" --bench "$model" 224 "$mode" \
                >>"$results" 2>>"$out/bench.log" || failed=1
            if [[ $have_torch -eq 1 ]]; then
                GRAFT_BENCH_DEVICE=$DEVICE GRAFT_BENCH_ITERS=${GRAFT_BENCH_ITERS:-10} \
                    "$PYTHON" "$ROOT/scripts/bench-pytorch.py" "$model" 224 "$mode" >>"$results" 2>>"$out/bench.log" || failed=1
            fi
        done
    done
    local note=""
    [[ $have_torch -eq 0 ]] && note="PyTorch with CUDA not importable: graft only"
    if [[ $failed -eq 0 ]]; then
        record bench ok $((SECONDS - t)) "$note" "\"results\": \"bench.jsonl\", \"pytorch\": $([[ $have_torch -eq 1 ]] && echo true || echo false)"
    else
        record bench failed $((SECONDS - t)) "a configuration failed, see bench.log" "\"results\": \"bench.jsonl\""
    fi
}

for s in "${STEPS[@]}"; do
    wanted "$s" || continue
    if [[ $s != env && $s != build && "${status[build]:-ok}" != ok ]]; then
        record "$s" skipped 0 "the build did not succeed"
        continue
    fi
    if [[ $s != env && $s != build && $have_gpu -eq 0 && $DEVICE != cpu ]]; then
        record "$s" skipped 0 "no NVIDIA GPU visible (nvidia-smi -L)"
        continue
    fi
    "run_$s"
done

entries=()
any_failed=0
for s in "${STEPS[@]}"; do
    [[ -n "${status[$s]:-}" ]] || continue
    entries+=("{\"step\": $(json_str "$s"), \"status\": $(json_str "${status[$s]}"), \"reason\": $(json_str "${reason[$s]}")}")
    [[ ${status[$s]} == failed ]] && any_failed=1
done
(IFS=,; printf '{"dry_run": false, "device": %s, "steps": [%s]}\n' "$(json_str "$DEVICE")" "${entries[*]}") >"$out/gpu-check.json"
echo "gpu-check: summary in $out/gpu-check.json"
exit $any_failed
