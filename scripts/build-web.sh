#!/usr/bin/env bash
# Build the demo web page (web/ -> web/dist) that `bucketsync demo` serves.
#   npm ci from the committed web/package-lock.json when node_modules does not match it,
#   then the Vite build when any input is newer than the last build. Both are skipped when
#   up to date, so scripts/demo and scripts/test can call this every time.
# usage: scripts/build-web.sh [--force]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WEB="$ROOT/web"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1
say() { echo "build-web: $*" >&2; }

command -v npm >/dev/null 2>&1 || { say "ERROR: npm is not on PATH (apt-get install nodejs npm; Node >= 20)"; exit 2; }
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 20 ] || { say "ERROR: node $(node --version) is too old: need Node >= 20"; exit 2; }

# one build at a time (scripts/demo and tests may start together)
if command -v flock >/dev/null 2>&1; then
  exec 9>"${TMPDIR:-/tmp}/bucketsync-build-web-$(printf '%s' "$WEB" | sha256sum | cut -c1-16).lock"
  flock 9
fi

STAMP="$WEB/node_modules/.bucketsync-install-stamp"
want=$(cat "$WEB/package.json" "$WEB/package-lock.json" | sha256sum | cut -d' ' -f1)
if [ "$FORCE" = 1 ] || [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  say "npm ci in web/ (node $(node --version))"
  export NO_PROXY="${NO_PROXY:+$NO_PROXY,}127.0.0.1,localhost" no_proxy="${NO_PROXY:+$NO_PROXY,}127.0.0.1,localhost"
  (cd "$WEB" && npm ci --no-audit --no-fund --loglevel=error >&2)
  printf '%s\n' "$want" > "$STAMP"
  FORCE=1
fi

BUILT="$WEB/dist/index.html"
if [ "$FORCE" = 0 ] && [ -f "$BUILT" ] \
  && [ -z "$(find "$WEB/index.html" "$WEB/src" "$WEB/vite.config.js" "$WEB/package-lock.json" -newer "$BUILT" -print -quit)" ]; then
  say "web/dist is up to date"
  exit 0
fi
say "vite build"
(cd "$WEB" && npx --no-install vite build --logLevel warn >&2)
say "built web/dist"
