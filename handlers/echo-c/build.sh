#!/usr/bin/env bash
# Builds the C echo handler into a component of `host:handler/handler`.
#
#   handlers/echo-c/build.sh [OUTPUT]
#
# OUTPUT defaults to target/handlers/echo-c.wasm under the repository root.
# Needs clang with the wasm32-wasi target and wasi-libc (Debian: clang lld
# wasi-libc libclang-rt-14-dev-wasm32), wit-bindgen and wasm-tools;
# handlers/install-toolchains.sh installs them all.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$(realpath -m "${1:-$repo/target/handlers/echo-c.wasm}")"
work="$repo/target/handlers/build/echo-c"
CC="${CC:-clang}"

for tool in "$CC" wit-bindgen wasm-tools; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "error: $tool not found; run handlers/install-toolchains.sh" >&2
        exit 1
    fi
done

rm -rf "$work"
mkdir -p "$work" "$(dirname "$out")"
# 1. Bindings: handler.h, handler.c and an object holding the world's type
#    (linked in as a custom section, so no `component embed` step is needed).
wit-bindgen c "$repo/wit" --world handler --out-dir "$work" >/dev/null
# 2. A reactor core module (exports _initialize, no main). Nothing here uses
#    stdio or files, so the module imports only wasi:io and needs no adapter.
"$CC" --target=wasm32-wasi -mexec-model=reactor -Os -Wall -Wextra -Werror \
    -I"$work" -Wl,--strip-all \
    -o "$work/echo.core.wasm" \
    "$here/echo.c" "$work/handler.c" "$work/handler_component_type.o"
# 3. The component; `component new` calls _initialize when it is instantiated.
wasm-tools component new "$work/echo.core.wasm" -o "$out"
echo "built $out"
