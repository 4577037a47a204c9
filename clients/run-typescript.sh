#!/usr/bin/env bash
# Tests the TypeScript client against the live server. Run from the repository
# root after `cargo build` (set USERS_SERVICE_BIN to test another binary).
set -euo pipefail
cd clients/typescript
npm ci
npm test
