#!/usr/bin/env bash
# Tests the TypeScript client against the live server: gRPC and gRPC-Web from
# Node, and gRPC-Web from a web page in headless Chromium. Run from the
# repository root after `cargo build` (set USERS_SERVICE_BIN to test another
# binary). Installs Debian's chromium when missing and we are root (as in CI);
# otherwise the browser test is skipped, except with CI=true, where it fails.
set -euo pipefail
cd clients/typescript

# Debian's Chromium, for test/browser.test.ts (CHROMIUM_BIN names another one).
if [[ -z "${CHROMIUM_BIN:-}" && ! -x /usr/bin/chromium ]]; then
  if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  else
    echo "run-typescript.sh: no /usr/bin/chromium (apt-get install chromium): the browser test is skipped unless CI=true" >&2
  fi
fi

npm ci
npm test
