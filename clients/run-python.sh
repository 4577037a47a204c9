#!/usr/bin/env bash
# Python client scenario: installs the pinned client requirements into a local
# virtualenv (clients/.tools/venv), then runs clients/python/test_scenario.py
# against the real server binary. Call from the repository root after
# `cargo build` (USERS_SERVICE_BIN overrides target/debug/users-service).
# Extra arguments go to pytest, e.g. clients/run-python.sh -k paging
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${CLIENTS_VENV:-clients/.tools/venv}
PYTHON=${PYTHON:-python3}
export USERS_SERVICE_BIN=${USERS_SERVICE_BIN:-target/debug/users-service}

if [[ ! -x "$USERS_SERVICE_BIN" ]]; then
  echo "run-python.sh: no executable at $USERS_SERVICE_BIN; run 'cargo build' first" >&2
  exit 1
fi

# The server runs its own Postgres from the installed server binaries.
if ! command -v initdb >/dev/null && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r clients/python/requirements.txt

# No DATABASE_URL: the test starts the server on its embedded Postgres.
env -u DATABASE_URL "$VENV/bin/python" -m pytest clients/python -v "$@"
