#!/usr/bin/env bash
# Builds the five non-Rust echo handlers into OUT_DIR (default
# target/handlers under the repository root), one after the other:
#   echo-python.wasm echo-js.wasm echo-c.wasm echo-go.wasm echo-wat.wasm
#
#   handlers/build-all.sh [OUT_DIR]
#
# Run handlers/install-toolchains.sh first.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
out_dir="$(realpath -m "${1:-$repo/target/handlers}")"
mkdir -p "$out_dir"

# cargo-installed tools (wasm-tools, wit-bindgen).
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

for lang in python js c go wat; do
    start=$SECONDS
    "$here/echo-$lang/build.sh" "$out_dir/echo-$lang.wasm"
    echo "echo-$lang: $((SECONDS - start))s, $(stat -c %s "$out_dir/echo-$lang.wasm") bytes" >&2
done
