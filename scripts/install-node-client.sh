#!/usr/bin/env bash
# Install the official PowerSync Node client used by the end-to-end tests
# (tests/e2e/client: @powersync/node 1.1.0 + better-sqlite3 12.x).
#
# Idempotent: a stamp in tests/e2e/client/node_modules records what was installed (hash of
# package.json + package-lock.json, Node ABI); a second run with nothing changed returns at once.
#
# better-sqlite3 is a native module. Its prebuilt binaries come from GitHub; when that is not
# reachable npm falls back to `node-gyp rebuild`, compiling it from source (~2 minutes on 2 cores;
# needs python3, make and g++). node-gyp needs the Node headers: if `nodedir` is not configured
# and the running Node's prefix has include/node/node.h, this script points node-gyp there so no
# header download is needed.
#
# usage: scripts/install-node-client.sh [--force] [--check] [--quiet]
#   --force   reinstall even if the stamp says it is up to date
#   --check   only report: exit 0 if installed and up to date, 1 if not (installs nothing)
#   --quiet   less output when already installed
#
# Exit codes: 0 ok, 1 not installed (--check), 2 prerequisites missing (node/npm/toolchain),
# 3 npm install or the post-install smoke check failed.
set -euo pipefail

FORCE=0
CHECK=0
QUIET=0
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    --check) CHECK=1 ;;
    --quiet) QUIET=1 ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-node-client: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLIENT_DIR="$ROOT/tests/e2e/client"
STAMP="$CLIENT_DIR/node_modules/.bucketsync-install-stamp"
MIN_NODE_MAJOR=20

say() { echo "install-node-client: $*" >&2; }
die() { local code="$1"; shift; say "ERROR: $*"; exit "$code"; }

# --- prerequisites --------------------------------------------------------------------------
command -v node >/dev/null 2>&1 || die 2 "node is not on PATH (need Node >= $MIN_NODE_MAJOR; the e2e tests drive @powersync/node)"
command -v npm >/dev/null 2>&1 || die 2 "npm is not on PATH (it ships with Node; need Node >= $MIN_NODE_MAJOR)"
NODE_VERSION="$(node -p 'process.versions.node')"
NODE_MAJOR="${NODE_VERSION%%.*}"
if ! [[ "$NODE_MAJOR" =~ ^[0-9]+$ ]] || (( NODE_MAJOR < MIN_NODE_MAJOR )); then
  die 2 "node $NODE_VERSION is too old: need Node >= $MIN_NODE_MAJOR (@powersync/node 1.1.0, better-sqlite3 12.x)"
fi
[[ -f "$CLIENT_DIR/package.json" ]] || die 2 "missing $CLIENT_DIR/package.json"

hash_inputs() {
  # Everything that should trigger a reinstall when it changes.
  {
    cat "$CLIENT_DIR/package.json"
    [[ -f "$CLIENT_DIR/package-lock.json" ]] && cat "$CLIENT_DIR/package-lock.json"
    node -p '`${process.versions.node} abi=${process.versions.modules} ${process.platform}-${process.arch}`'
  } | sha256sum | cut -d' ' -f1
}
WANT="$(hash_inputs)"

installed_ok() {
  [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP" 2>/dev/null)" == "$WANT" ]] \
    && [[ -f "$CLIENT_DIR/node_modules/@powersync/node/package.json" ]] \
    && [[ -f "$CLIENT_DIR/node_modules/better-sqlite3/build/Release/better_sqlite3.node" ]]
}

if (( CHECK )); then
  if installed_ok; then
    (( QUIET )) || say "up to date ($CLIENT_DIR/node_modules, node $NODE_VERSION)"
    exit 0
  fi
  say "not installed or out of date: run scripts/install-node-client.sh"
  exit 1
fi

# --- serialise concurrent runs (parallel pytest workers, CI + developer) -----------------------
LOCK="${TMPDIR:-/tmp}/bucketsync-node-client-$(printf '%s' "$CLIENT_DIR" | sha256sum | cut -c1-16).lock"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$LOCK"
  if ! flock -n 9; then
    say "another install is running; waiting for it ($LOCK)"
    flock 9
  fi
fi

if (( ! FORCE )) && installed_ok; then
  (( QUIET )) || say "already installed and up to date (node $NODE_VERSION); nothing to do"
  exit 0
fi

for tool in python3 make g++; do
  command -v "$tool" >/dev/null 2>&1 \
    || say "WARNING: $tool not found; better-sqlite3 must compile from source if no prebuilt binary can be downloaded"
done

# Node headers for node-gyp without a download (offline machines).
if [[ -z "${npm_config_nodedir:-}${NPM_CONFIG_NODEDIR:-}" ]]; then
  configured="$(cd "$CLIENT_DIR" && npm config get nodedir 2>/dev/null || true)"
  if [[ -z "$configured" || "$configured" == "undefined" || "$configured" == "null" ]]; then
    prefix="$(cd "$(dirname "$(node -p 'process.execPath')")/.." && pwd)"
    if [[ -f "$prefix/include/node/node.h" ]]; then
      export npm_config_nodedir="$prefix"
      say "using Node headers from $prefix/include/node (npm_config_nodedir)"
    fi
  fi
fi

# undici/npm honour proxies; never proxy loopback.
export NO_PROXY="${NO_PROXY:+$NO_PROXY,}127.0.0.1,localhost"
export no_proxy="$NO_PROXY"

start=$(date +%s)
cd "$CLIENT_DIR"
rm -f "$STAMP"
if [[ -f package-lock.json ]]; then
  say "npm ci in $CLIENT_DIR (node $NODE_VERSION, npm $(npm --version)); better-sqlite3 may compile from source (~2 min)"
  npm ci --no-audit --no-fund >&2 || die 3 "npm ci failed (see output above)"
else
  say "no package-lock.json: npm install in $CLIENT_DIR (node $NODE_VERSION, npm $(npm --version))"
  npm install --no-audit --no-fund >&2 || die 3 "npm install failed (see output above)"
fi

# Smoke check: the SDK imports and the native SQLite module loads in this Node.
if ! node --input-type=module -e "
  await import('@powersync/node');
  const { default: Database } = await import('better-sqlite3');
  const db = new Database(':memory:');
  db.prepare('select 1').get();
  db.close();
" >&2; then
  die 3 "post-install check failed: @powersync/node or better-sqlite3 does not load (try --force)"
fi

printf '%s\n' "$WANT" > "$STAMP"
say "installed in $(( $(date +%s) - start ))s: $(node -p "'@powersync/node ' + require('@powersync/node/package.json').version + ', better-sqlite3 ' + require('better-sqlite3/package.json').version")"
