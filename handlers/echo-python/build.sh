#!/usr/bin/env bash
# Builds the Python echo handler into a component of `host:handler/handler`.
#
#   handlers/echo-python/build.sh [OUTPUT]
#
# OUTPUT defaults to target/handlers/echo-python.wasm under the repository
# root. Needs componentize-py (handlers/install-toolchains.sh installs it).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$(realpath -m "${1:-$repo/target/handlers/echo-python.wasm}")"
work="$repo/target/handlers/build/echo-python"

if ! command -v componentize-py >/dev/null 2>&1; then
    echo "error: componentize-py not found; run handlers/install-toolchains.sh" >&2
    exit 1
fi

# componentize-py imports the app from its working directory and would leave
# __pycache__ there: build from a copy outside the source tree.
rm -rf "$work"
mkdir -p "$work" "$(dirname "$out")"
cp "$here/app.py" "$work/"
cd "$work"
componentize-py -d "$repo/wit" -w handler componentize app -o "$out"
echo "built $out"
