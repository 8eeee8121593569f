#!/usr/bin/env bash
# Builds the JavaScript echo handler into a component of `host:handler/handler`.
#
#   handlers/echo-js/build.sh [OUTPUT]
#
# OUTPUT defaults to target/handlers/echo-js.wasm under the repository root.
# Needs componentize-js, from target/tools/js (where
# handlers/install-toolchains.sh installs it) or else from PATH.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$(realpath -m "${1:-$repo/target/handlers/echo-js.wasm}")"

componentize="$repo/target/tools/js/node_modules/.bin/componentize-js"
if [ ! -x "$componentize" ]; then
    if command -v componentize-js >/dev/null 2>&1; then
        componentize="$(command -v componentize-js)"
    else
        echo "error: componentize-js not found; run handlers/install-toolchains.sh" >&2
        exit 1
    fi
fi

mkdir -p "$(dirname "$out")"
# `-d http fetch-event`: without it the component imports wasi:http (for
# StarlingMonkey's fetch() and its incoming-handler), which the host does not
# link, and the host refuses the component.
"$componentize" "$here/echo.js" \
    --wit "$repo/wit" --world-name handler \
    --disable http fetch-event \
    --out "$out"
echo "built $out"
