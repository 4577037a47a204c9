#!/usr/bin/env bash
# Proto hygiene with buf (config: buf.yaml at the repository root):
#   buf lint, buf format -d --exit-code, and buf breaking against the parent
#   commit (BUF_AGAINST_REF overrides HEAD~1). Call from anywhere in the repo.
# buf comes from npm, pinned, installed locally under clients/.tools/.
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION=1.75.0
TOOLS=clients/.tools
LOCAL_BUF=$TOOLS/node_modules/.bin/buf

if [[ -x "$LOCAL_BUF" ]] && [[ "$("$LOCAL_BUF" --version 2>/dev/null)" == "$BUF_VERSION" ]]; then
  BUF=$LOCAL_BUF
elif command -v buf >/dev/null && [[ "$(buf --version 2>/dev/null)" == "$BUF_VERSION" ]]; then
  BUF=buf
else
  echo "installing @bufbuild/buf@$BUF_VERSION into $TOOLS"
  npm install --prefix "$TOOLS" --no-audit --no-fund --loglevel=error "@bufbuild/buf@$BUF_VERSION"
  BUF=$LOCAL_BUF
fi
echo "buf $("$BUF" --version)"

echo "== buf lint"
"$BUF" lint
echo "== buf format -d --exit-code"
"$BUF" format -d --exit-code

AGAINST_REF=${BUF_AGAINST_REF:-HEAD~1}
echo "== buf breaking against $AGAINST_REF"
if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  echo "skipped: not a git checkout"
elif ! git rev-parse --verify --quiet "$AGAINST_REF^{commit}" >/dev/null; then
  echo "skipped: $AGAINST_REF does not exist (first commit, or a shallow clone: git fetch --deepen=1)"
else
  "$BUF" breaking proto --against ".git#ref=$AGAINST_REF,subdir=proto"
fi
echo "buf: all checks passed"
