#!/usr/bin/env bash
# Builds the WAT echo handler into a component of `host:handler/handler`.
#
#   handlers/echo-wat/build.sh [OUTPUT]
#
# OUTPUT defaults to target/handlers/echo-wat.wasm under the repository root.
# Needs only wasm-tools (handlers/install-toolchains.sh installs it).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$(realpath -m "${1:-$repo/target/handlers/echo-wat.wasm}")"
work="$repo/target/handlers/build/echo-wat"

if ! command -v wasm-tools >/dev/null 2>&1; then
    echo "error: wasm-tools not found; run handlers/install-toolchains.sh" >&2
    exit 1
fi

mkdir -p "$work" "$(dirname "$out")"
# 1. Assemble the core module and record the world it implements in a
#    custom section, 2. turn it into a component (no WASI adapter: the module
#    imports nothing but wasi:io).
wasm-tools component embed "$repo/wit" --world handler "$here/echo.wat" -o "$work/echo.core.wasm"
wasm-tools component new "$work/echo.core.wasm" -o "$out"
wasm-tools validate "$out"
echo "built $out"
