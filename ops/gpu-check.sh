#!/usr/bin/env bash
# For a host with an NVIDIA GPU; nothing in CI runs it. Runs SmolLM2 on the GPU
# through berth and prints what NVML saw:
#   - a private fleet (`berth up` on other ports, one analyzer, a placeholder
#     simulated worker) and berth-agent on this host's GPUs (NVML, process mode)
#     with llama-server built for CUDA (BERTH_LLAMA_CUDA=1 ops/build-llama.sh,
#     when nvcc is there; else the CPU build, and it says so);
#   - `berth start` of SmolLM2 on that worker with every layer on the GPU, one
#     chat completion at its endpoint, `berth stop`;
#   - GPU memory (nvidia-smi) before, while it runs and after, its processes,
#     and the memory "used outside berth" as the agent computes it and as the
#     books hold it: berth's own server must not count.
#
#   ops/gpu-check.sh                                  # builds what is missing
#   LLAMA_SERVER=/opt/llama/llama-server ops/gpu-check.sh
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
NATS_PORT=${NATS_PORT:-4322}
PG_PORT=${PG_PORT:-5533}
DIR="$ROOT/.berth/gpu-check"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
NATS="nats://127.0.0.1:$NATS_PORT"
DB="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
WORKER=gpu-check

log() { printf 'gpu-check: %s\n' "$*" >&2; }
die() { printf 'gpu-check: error: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }
berth() { "$BIN/berth" --nats-url "$NATS" --database-url "$DB" "$@"; }

have nvidia-smi || die "nvidia-smi not found: this needs an NVIDIA GPU and its driver"
nvidia-smi -L >&2 || die "nvidia-smi sees no GPU"

PIDS=()
# shellcheck disable=SC2329 # only called from the EXIT trap
cleanup() {
    local p
    for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]+"${PIDS[@]}"}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

gpu_memory() {
    printf '%s\n' "-- $1: GPU memory (nvidia-smi: index, used MiB, total MiB)"
    nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv,noheader,nounits
    printf '%s\n' "-- $1: processes on the GPUs (pid, MiB)"
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits
}

# What berth counts as used outside it: the agent's own reading (NVML less its
# servers' processes), then what its last heartbeat put in the books.
outside() {
    printf '%s\n' "-- $1: used outside berth, as the agent reads it now"
    "$BIN/berth-agent" --print-inventory --worker "$WORKER" --state-dir "$DIR/agent" |
        python3 -c 'import json, sys
for w in json.load(sys.stdin):
    for u in w["usage"]:
        print(f"GPU {u[\"index\"]}: {u[\"used_outside_bytes\"] / 2**20:.0f} MiB")'
    if [ -n "${PSQL:-}" ]; then
        sleep 3 # two heartbeats: the books follow the agent every second
        printf '%s\n' "-- $1: in the books (gpus table, MiB)"
        "$PSQL" -h 127.0.0.1 -p "$PG_PORT" -U postgres -At -F ' ' -c \
            "SELECT idx, used_outside_bytes / 1048576, reserved_bytes / 1048576
             FROM gpus WHERE worker_id = '$WORKER' ORDER BY idx"
    fi
}

# --- binaries and the model ------------------------------------------------------

log "building berth"
cargo build --bins >&2
MODEL=$(ops/fetch-models.sh | head -n1)
LLAMA=${LLAMA_SERVER:-}
if [ -z "$LLAMA" ]; then
    if have nvcc || [ -x /usr/local/cuda/bin/nvcc ]; then
        LLAMA=$(PATH="$PATH:/usr/local/cuda/bin" BERTH_LLAMA_CUDA=1 ops/build-llama.sh | head -n1)
    else
        log "nvcc not found: no CUDA build of llama-server; the CPU build runs the model"
        LLAMA=$(ops/build-llama.sh | head -n1)
    fi
fi
if "$LLAMA" --list-devices 2>&1 | grep -q CUDA; then
    log "llama-server with CUDA: $LLAMA"
else
    log "$LLAMA lists no CUDA device: the model runs on the CPU, NVML sees only the rest"
fi
PG_BIN=$(sed -n 's/^BERTH_PG_BIN=//p' .berth/env 2>/dev/null || true)
PSQL=$(command -v psql || true)
if [ -z "$PSQL" ] && [ -x "$PG_BIN/psql" ]; then PSQL="$PG_BIN/psql"; fi

# --- the fleet -------------------------------------------------------------------

mkdir -p "$DIR"
cat >"$DIR/placeholder.toml" <<'EOF'
# berth up needs a simulated worker; the model goes to the NVML one (selector).
[[workers]]
id = "placeholder"
[[workers.gpus]]
name = "placeholder"
vram = "1GiB"
EOF
# NATS roles as berth up runs them, with credentials for this host's NVML agent too.
"$BIN/berth" auth --dir "$DIR/auth" init >/dev/null
"$BIN/berth" auth --dir "$DIR/auth" add-agent "$WORKER" >/dev/null
export BERTH_NATS_CREDS="$DIR/auth/publisher.nk"
berth up --dir "$DIR" --nats-port "$NATS_PORT" --pg-port "$PG_PORT" --analyzers 1 \
    --gateway-listen "127.0.0.1:$((NATS_PORT + 2))" \
    --inventory "$DIR/placeholder.toml" 2>"$DIR/up.log" &
PIDS+=("$!")
berth ready --workers 1 --timeout 120 >&2 || die "berth up did not come up (see $DIR/up.log)"

gpu_memory "before"
"$BIN/berth-agent" --nats-url "$NATS" --nats-creds "$DIR/auth/agent-$WORKER.nk" \
    --worker "$WORKER" --label gpu-check=yes \
    --runtime process --llama-server "$LLAMA" --state-dir "$DIR/agent" \
    --port-range 41000-41099 --heartbeat-secs 1 --metrics-addr off 2>"$DIR/agent.log" &
PIDS+=("$!")
berth ready --workers 2 --timeout 60 >&2 || die "the NVML agent did not register (see $DIR/agent.log)"
outside "before"

# --- the model -------------------------------------------------------------------

t0=$(date +%s.%N)
# Every layer on the GPU (the agent's default with NVML GPUs).
berth start smol --model-file "$MODEL" --ctx 2048 --selector gpu-check=yes --wait --timeout 300
t1=$(date +%s.%N)
ENDPOINT=$(berth ps --json | python3 -c 'import json, sys
print(next(i.get("endpoint") or "" for i in json.load(sys.stdin) if i["instance"] == "smol"))')
[ -n "$ENDPOINT" ] || die "smol has no endpoint: berth ps --explain smol"
awk -v a="$t0" -v b="$t1" -v e="$ENDPOINT" 'BEGIN { printf "publish -> running: %.2f s, endpoint %s\n", b - a, e }'
python3 - "$ENDPOINT" <<'EOF'
import json, sys, urllib.request
body = {"model": "smol", "max_tokens": 16,
        "messages": [{"role": "user", "content": "Say hello."}]}
req = urllib.request.Request(f"http://{sys.argv[1]}/v1/chat/completions",
                             json.dumps(body).encode(), {"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=60))
print(f"chat completion: {reply['usage']['completion_tokens']} tokens:",
      repr(reply["choices"][0]["message"]["content"]))
EOF
gpu_memory "running"
outside "running"
grep -E 'offloaded|CUDA0 model buffer' "$DIR/agent/logs/smol/"*.log | tail -n 3 || true

berth stop smol --wait
gpu_memory "after the stop"
outside "after the stop"
log "done; logs in $DIR (up.log, agent.log, agent/logs/)"
