#!/usr/bin/env bash
# End-to-end check with grpcurl and no proto files: starts the users-service
# binary on its embedded Postgres, sends the README's JSON requests through
# server reflection, checks the answers, and stops it with SIGTERM.
#
# Usage: tests/grpcurl.sh [path/to/users-service]   (default: target/debug/users-service)
set -euo pipefail

BIN=${1:-target/debug/users-service}
PORT=${E2E_PORT:-50551}
ADDR=127.0.0.1:$PORT
DATA_DIR=$(mktemp -d /tmp/users-service-e2e.XXXXXX)
chmod 755 "$DATA_DIR"
LOG=$DATA_DIR/service.log

cleanup() {
  if [[ -n "${PID:-}" ]] && kill -0 "$PID" 2>/dev/null; then kill -TERM "$PID"; wait "$PID" || true; fi
  rm -rf "$DATA_DIR"
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; echo "--- service log ---" >&2; cat "$LOG" >&2; exit 1; }
call() { grpcurl -plaintext -H "authorization: Bearer $(cat "$DATA_DIR/admin.key")" -d "$2" "$ADDR" "$1"; }
# Field of a JSON document on stdin, by jq path.
field() { jq -r "$1"; }
expect() { [[ "$2" == "$3" ]] || fail "$1: expected '$3', got '$2'"; echo "ok: $1"; }

env -u DATABASE_URL "$BIN" --listen "$ADDR" --data-dir "$DATA_DIR" >"$LOG" 2>&1 &
PID=$!
for _ in $(seq 1 150); do
  if grpcurl -plaintext "$ADDR" grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING; then break; fi
  kill -0 "$PID" 2>/dev/null || fail "service exited during start-up"
  sleep 0.2
done

[[ "$(stat -c %a "$DATA_DIR/admin.key")" == 600 ]] || fail "admin.key is not mode 0600"
echo "ok: the bootstrap admin key is in admin.key, mode 0600"

services=$(grpcurl -plaintext "$ADDR" list)
for s in users.v1.UsersService users.v1.TenantsService grpc.health.v1.Health; do
  grep -qx "$s" <<<"$services" || fail "reflection does not list $s"
done
echo "ok: reflection lists the services"
grpcurl -plaintext "$ADDR" describe users.v1.UsersService.CreateUser | grep -q "Creates a user" \
  || fail "describe shows no doc comment"
echo "ok: describe shows doc comments"

default_tenant=$(call users.v1.TenantsService/ListTenants '{"filter": {"reference": {"equalTo": "default"}}}' | field '.data[0].id')

created=$(call users.v1.UsersService/CreateUser '{"user": {"reference": "8d04d09a-8ff8-4393-840d-c69f3f1f7dfa", "email": "", "phone": "+15550001234", "firstName": "Anna", "lastName": "W", "locale": "en-Us", "timezone": "Asia/Bangkok", "isOptedIn": false, "active": true}}')
id=$(field '.user.id' <<<"$created")
expect "CreateUser normalizes the locale" "$(field '.user.locale' <<<"$created")" "en-US"
expect "CreateUser lands in the default tenant" "$(field '.user.tenantId' <<<"$created")" "$default_tenant"
expect "CreateUser answers synced" "$(field '.user.synced' <<<"$created")" "true"
expect "CreateUser stores the phone" "$(field '.user.phone' <<<"$created")" "+15550001234"
[[ "$(field '.user.createdAt' <<<"$created")" != null ]] || fail "no createdAt"

got=$(call users.v1.UsersService/GetUser "{\"id\": \"$id\"}")
expect "GetUser returns the user" "$(field '.user.id' <<<"$got")" "$id"

updated=$(call users.v1.UsersService/UpdateUser "{\"id\": \"$id\", \"user\": {\"firstName\": \"Anna-Maria\"}}")
expect "UpdateUser changes the first name" "$(field '.user.firstName' <<<"$updated")" "Anna-Maria"
expect "UpdateUser leaves the last name" "$(field '.user.lastName' <<<"$updated")" "W"

deactivated=$(call users.v1.UsersService/UpdateUser "{\"id\": \"$id\", \"user\": {\"active\": false}}")
expect "UpdateUser active=false deactivates" "$(field '.user.active' <<<"$deactivated")" "false"
again=$(call users.v1.UsersService/DeactivateUser "{\"id\": \"$id\"}")
expect "DeactivateUser is idempotent" "$(field '.user.updatedAt' <<<"$again")" "$(field '.user.updatedAt' <<<"$deactivated")"
reactivated=$(call users.v1.UsersService/ReactivateUser "{\"id\": \"$id\"}")
expect "ReactivateUser reactivates" "$(field '.user.active' <<<"$reactivated")" "true"

listed=$(call users.v1.UsersService/ListUsers '{"limit": 10, "offset": 0, "filter": {"reference": {"equalTo": "8d04d09a-8ff8-4393-840d-c69f3f1f7dfa"}}}')
expect "ListUsers counts the match" "$(field '.totalCount' <<<"$listed")" "1"
expect "ListUsers returns the user" "$(field '.data[0].id' <<<"$listed")" "$id"

tenant=$(call users.v1.TenantsService/CreateTenant '{"tenant": {"name": "Acme", "reference": "acme"}}')
expect "CreateTenant returns the tenant" "$(field '.tenant.reference' <<<"$tenant")" "acme"
tenant_id=$(field '.tenant.id' <<<"$tenant")
expect "GetTenant" "$(call users.v1.TenantsService/GetTenant "{\"id\": \"$tenant_id\"}" | field '.tenant.name')" "Acme"

if out=$(call users.v1.UsersService/CreateUser '{"user": {"email": "nope", "phone": "123"}}' 2>&1); then
  fail "an invalid user was accepted"
fi
grep -q "InvalidArgument" <<<"$out" || fail "expected InvalidArgument, got: $out"
grep -q "user.email" <<<"$out" && grep -q "user.phone" <<<"$out" || fail "violations missing: $out"
echo "ok: invalid input is INVALID_ARGUMENT listing every field"

if out=$(call users.v1.UsersService/GetUser "{\"id\": \"$tenant_id\"}" 2>&1); then fail "unknown id found"; fi
grep -q "NotFound" <<<"$out" || fail "expected NotFound, got: $out"
echo "ok: unknown id is NOT_FOUND"

if out=$(grpcurl -plaintext -d '{}' "$ADDR" users.v1.UsersService/ListUsers 2>&1); then
  fail "a call without credentials was answered"
fi
grep -q "Unauthenticated" <<<"$out" || fail "expected Unauthenticated, got: $out"
echo "ok: a call without credentials is UNAUTHENTICATED"

kill -TERM "$PID"
status=0
wait "$PID" || status=$?
PID=
expect "SIGTERM exits 0" "$status" "0"
grep -q "grpc.method" "$LOG" || fail "no per-call log line"
if grep -q "$(cut -d_ -f3 "$DATA_DIR/admin.key")" "$LOG"; then fail "the admin token is in the log"; fi
echo "ok: no token in the log"
echo "grpcurl end-to-end: all checks passed"
