#!/usr/bin/env bash
# Builds the Python `wasi:http/proxy` echo into a component.
#
#   handlers/http-echo-python/build.sh [OUTPUT]
#
# OUTPUT defaults to target/handlers/http-echo-python.wasm under the
# repository root. Needs componentize-py (handlers/install-toolchains.sh
# python). The WIT in wit/ is wasi:http 0.2 as wasmtime-wasi-http 48.0.8
# ships it (its wit/ directory, copied unchanged).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$(realpath -m "${1:-$repo/target/handlers/http-echo-python.wasm}")"
work="$repo/target/handlers/build/http-echo-python"

if ! command -v componentize-py >/dev/null 2>&1; then
    echo "error: componentize-py not found; run handlers/install-toolchains.sh python" >&2
    exit 1
fi

# componentize-py imports the app from its working directory and would leave
# __pycache__ there: build from a copy outside the source tree.
rm -rf "$work"
mkdir -p "$work" "$(dirname "$out")"
cp "$here/app.py" "$work/"
cd "$work"
componentize-py -d "$here/wit" -w wasi:http/proxy componentize app -o "$out"
echo "built $out"
