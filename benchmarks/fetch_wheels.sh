#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh needs into ./wheels (or $WHEELS), for a GPU
# machine without internet. Run it where pip can reach an index, with the GPU machine's
# Python version (PYTHON_VERSION, default: this interpreter's) so binary wheels match.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-wheels}"
PY="${PYTHON:-python3}"
VERSION="${PYTHON_VERSION:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
mkdir -p "$WHEELS"
grep -v '^\s*#' benchmarks/gpu_requirements.txt | grep -v '^\s*$' | while read -r req; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$VERSION" \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
        -d "$WHEELS" "$req" || echo "warning: could not download $req" >&2
done
du -sh "$WHEELS"
