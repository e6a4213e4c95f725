#!/usr/bin/env bash
# The project's test command: provision servers, then run the workspace
# tests against them. Extra arguments go to nextest / cargo test.
set -euo pipefail

cd "$(dirname "$0")/.."

# Kill servers a crashed or interrupted test left behind. The harness puts
# each server's data under /tmp/berth-test-*, so only processes with that in
# their command line are touched. Walks /proc so it needs no procps.
# shellcheck disable=SC2317,SC2329 # only called from the EXIT trap
cleanup_strays() {
    local dir pid comm cmdline pids=()
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        comm=$(cat "$dir/comm" 2>/dev/null) || continue
        case $comm in
            nats-server | postgres) ;;
            *) continue ;;
        esac
        cmdline=$(tr '\0' ' ' <"$dir/cmdline" 2>/dev/null) || continue
        case $cmdline in
            *berth-test-*) pids+=("$pid") ;;
        esac
    done
    [ "${#pids[@]}" -gt 0 ] || return 0
    # SIGINT is a fast shutdown for postgres and a clean stop for nats.
    kill -INT "${pids[@]}" 2>/dev/null || true
    local _ p alive
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        alive=()
        for p in "${pids[@]}"; do
            if kill -0 "$p" 2>/dev/null; then alive+=("$p"); fi
        done
        [ "${#alive[@]}" -gt 0 ] || return 0
        sleep 0.2
    done
    kill -KILL "${alive[@]}" 2>/dev/null || true
}
trap 'cleanup_strays || true' EXIT
# Turn signals into a normal exit so the EXIT trap still runs.
trap 'exit 130' INT
trap 'exit 143' TERM

ops/setup.sh
# The real GGUF model the estimator tests read (cached under .berth/models). Outside CI
# those tests skip with a note when it cannot be fetched; under CI (CI set) they fail, so
# a missing download stops here with its own error.
if [ -n "${CI:-}" ]; then
    ops/fetch-models.sh
else
    ops/fetch-models.sh || echo "warning: could not fetch the test model; its tests will skip" >&2
fi

# Read .berth/env as data rather than sourcing it, so odd paths can't run code.
while IFS='=' read -r key value; do
    case $key in
        BERTH_NATS_SERVER | BERTH_PG_BIN | BERTH_LLAMA_SERVER | BERTH_RPC_SERVER) export "$key=$value" ;;
    esac
done <.berth/env
export PYTHONPATH="$PWD/.berth/py${PYTHONPATH:+:$PYTHONPATH}"

# Every binary, also with `-p`: the CLI and chaos tests run the ones next to the binary
# under test (`berth up` runs berth-analyzer and berth-agent, `berth bench` runs berth-bench).
cargo build --workspace --bins

rc=0
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --profile ci "$@" || rc=$?
else
    cargo test --workspace "$@" || rc=$?
fi
exit "$rc"
