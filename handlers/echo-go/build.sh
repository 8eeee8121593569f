#!/usr/bin/env bash
# Builds the Go echo handler into a component of `host:handler/handler`.
#
#   handlers/echo-go/build.sh [OUTPUT]
#
# OUTPUT defaults to target/handlers/echo-go.wasm under the repository root.
# Needs Go >= 1.24 (go:wasmexport) and wasm-tools;
# handlers/install-toolchains.sh installs both.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$(realpath -m "${1:-$repo/target/handlers/echo-go.wasm}")"
work="$repo/target/handlers/build/echo-go"

for tool in go wasm-tools; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "error: $tool not found; run handlers/install-toolchains.sh" >&2
        exit 1
    fi
done

rm -rf "$work"
mkdir -p "$work/adapter-wit/deps" "$(dirname "$out")"

# Keep Go's caches under target/; never download a toolchain or a module.
export GOCACHE="$repo/target/tools/go-cache"
export GOPATH="$repo/target/tools/go-path"
export GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-mod=mod

# 1. A wasip1 reactor: exports _initialize, memory, handle and cabi_realloc;
#    imports wasi:io (abi.go) and wasi_snapshot_preview1 (Go's runtime).
(cd "$here" && GOOS=wasip1 GOARCH=wasm go build -trimpath -buildmode=c-shared \
    -ldflags='-s -w' -o "$work/echo.core.wasm" .)

# The adapter's scratch area (address 8192) must lie below Go's data, in
# the range Go's linker leaves free (it starts data at 12288 or above).
first_data="$(wasm-tools print "$work/echo.core.wasm" |
    sed -n 's/^ *(data (;[0-9]*;) (i32.const \([0-9]*\)).*/\1/p' |
    awk 'NR == 1 || $1 < min { min = $1 } END { print min }')"
if [ -z "$first_data" ] || [ "$first_data" -lt 12288 ]; then
    echo "error: Go's data starts at ${first_data:-?}, below 12288: the adapter's scratch area would overlap it" >&2
    exit 1
fi

# 2. The WASI preview 1 adapter (wasip1-adapter/adapter.wat): its world
#    imports subsets of wasi:clocks, wasi:random and wasi:cli, and wasi:io
#    from the repository's wit/deps.
cp "$here/wasip1-adapter/adapter.wit" "$work/adapter-wit/"
cp "$here"/wasip1-adapter/deps/*.wit "$repo"/wit/deps/*.wit "$work/adapter-wit/deps/"
wasm-tools component embed "$work/adapter-wit" --world adapter \
    "$here/wasip1-adapter/adapter.wat" -o "$work/adapter.wasm"

# 3. Record the handler's world in the Go module, then make the component;
#    the adapter calls Go's _initialize when the instance starts.
wasm-tools component embed "$repo/wit" --world handler "$work/echo.core.wasm" \
    -o "$work/echo.embed.wasm"
wasm-tools component new "$work/echo.embed.wasm" \
    --adapt "wasi_snapshot_preview1=$work/adapter.wasm" -o "$out"
echo "built $out"
