#!/usr/bin/env bash
# Measures one finetune recipe on an image folder with a test split: trains, exports, evaluates on the test
# images, and appends one JSON line to OUT.jsonl (name, data, seed, test accuracy, training seconds).
#
#   scripts/recipe.sh OUT NAME DATA SEED [finetune flags...]
#
# Used to choose graft's defaults (README "Choosing the defaults"); GRAFT (default target/release/graft).
# TTA="flip crops" also evaluates the same model with each `--tta` mode (fields test_acc_tta_MODE).
# EVAL_FLAGS (e.g. "--precision bf16") go to every `graft eval`.
set -euo pipefail
if [ $# -lt 4 ]; then sed -n '2,7p' "$0"; exit 2; fi
out=$1 name=$2 data=$3 seed=$4
shift 4
graft=${GRAFT:-target/release/graft}
run=$(mktemp -d "${TMPDIR:-/tmp}/recipe-XXXXXX")
start=$(date +%s.%N)
"$graft" finetune --base efficientnet_lite0 --data "$data" --image-size 96 --crop-pct 1 --seed "$seed" \
    --run-dir "$run/run" --quiet "$@" >"$run/log" 2>&1 || { cat "$run/log" >&2; exit 1; }
end=$(date +%s.%N)
"$graft" export "$run/run" --out "$run/model.safetensors" >/dev/null
acc=$("$graft" eval --model "$run/model.safetensors" --data "$data" --split test --json ${EVAL_FLAGS:-} |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["accuracy"])')
tta_json="{}"
for mode in ${TTA:-}; do
    a=$("$graft" eval --model "$run/model.safetensors" --data "$data" --split test --json --tta "$mode" ${EVAL_FLAGS:-} |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["accuracy"])')
    tta_json=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["test_acc_tta_"+sys.argv[2]]=float(sys.argv[3]); print(json.dumps(d))' "$tta_json" "$mode" "$a")
done
train_s=$(python3 -c "print(round($end - $start, 1))")
flags="$*"
python3 -c 'import json,sys; print(json.dumps({"name":sys.argv[1],"data":sys.argv[2],"seed":int(sys.argv[3]),"test_acc":float(sys.argv[4]),"train_s":float(sys.argv[5]),"flags":sys.argv[6],**json.loads(sys.argv[7])}))' \
    "$name" "$data" "$seed" "$acc" "$train_s" "$flags" "$tta_json" | tee -a "$out.jsonl"
rm -rf "$run"
