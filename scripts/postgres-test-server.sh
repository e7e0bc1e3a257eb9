#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests of PostgreSQL studies, on a loopback port.
#
#   eval "$(scripts/postgres-test-server.sh)"     # start (or find running); prints an export line
#   cargo test --test search_workers              # the tests read GRAFT_TEST_POSTGRES_URL
#   scripts/postgres-test-server.sh stop
#   scripts/postgres-test-server.sh status        # exit status 0 when running
#
# `start` (the default) is idempotent: a server already running in the data folder is reused. The server
# is Debian's `postgresql` package (installed with apt-get when pg_ctl is missing and we are root; otherwise
# it says what to install). initdb refuses to run as root, so as root the server runs as the system user
# graft-pg (created if needed), which owns the data folder. Trust authentication, loopback only, socket in
# the data folder: for tests, never for data you keep.
# Settings: GRAFT_PG_PORT (54329), GRAFT_PG_DIR (/tmp/graft-pg-test), GRAFT_PG_USER (graft-pg).
# Everything but the export line goes to stderr.
set -euo pipefail

port=${GRAFT_PG_PORT:-54329}
dir=${GRAFT_PG_DIR:-/tmp/graft-pg-test}
os_user=${GRAFT_PG_USER:-graft-pg}
db_user=graft
url="postgres://$db_user@127.0.0.1:$port/postgres"

find_bin() {
    if command -v pg_ctl >/dev/null && command -v initdb >/dev/null; then
        bindir=$(dirname "$(readlink -f "$(command -v initdb)")")
        return 0
    fi
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [[ -x $d/pg_ctl && -x $d/initdb ]]; then
            bindir=$d
            return 0
        fi
    done
    return 1
}

install_postgres() {
    if find_bin; then
        return 0
    fi
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "postgres-test-server.sh: PostgreSQL is not installed (no pg_ctl/initdb); install Debian's" \
            "'postgresql' package (apt-get install postgresql) and rerun" >&2
        exit 1
    fi
    echo "postgres-test-server.sh: installing Debian's postgresql package" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || true
    apt-get install -y -qq postgresql >&2
    find_bin || { echo "postgres-test-server.sh: pg_ctl still missing after apt-get" >&2; exit 1; }
}

# Runs a server binary as the owner of the data folder.
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        (cd / && runuser -u "$os_user" -- "$@")
    else
        "$@"
    fi
}

running() {
    [[ -f $dir/data/PG_VERSION ]] && as_owner "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1
}

start() {
    install_postgres
    if [[ $(id -u) -eq 0 ]] && ! id "$os_user" >/dev/null 2>&1; then
        useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$os_user"
    fi
    mkdir -p "$dir"
    if [[ $(id -u) -eq 0 ]]; then
        chown "$os_user" "$dir"
    fi
    chmod 700 "$dir"
    if ! running; then
        if [[ ! -f $dir/data/PG_VERSION ]]; then
            rm -rf "$dir/data"
            as_owner "$bindir/initdb" -D "$dir/data" -U "$db_user" --auth=trust -E UTF8 --locale=C.UTF-8 \
                >"$dir/initdb.log" 2>&1 ||
                { cat "$dir/initdb.log" >&2; exit 1; }
        fi
        as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-p $port -c listen_addresses=127.0.0.1 -k $dir -c max_connections=200 -c fsync=off" \
            start >&2 ||
            { cat "$dir/server.log" >&2; exit 1; }
    fi
    as_owner "$bindir/pg_isready" -h 127.0.0.1 -p "$port" -t 30 >&2
    echo "postgres-test-server.sh: running in $dir on 127.0.0.1:$port" >&2
    echo "export GRAFT_TEST_POSTGRES_URL=$url"
}

stop() {
    find_bin || exit 0
    if running; then
        as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >&2
    else
        echo "postgres-test-server.sh: no server running in $dir" >&2
    fi
}

case ${1:-start} in
start) start ;;
stop) stop ;;
status) find_bin && running ;;
url) echo "$url" ;;
*)
    echo "usage: $0 [start|stop|status|url]" >&2
    exit 2
    ;;
esac
