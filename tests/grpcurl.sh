#!/usr/bin/env bash
# End-to-end check with grpcurl and no proto files: starts the users-service
# binary on its embedded Postgres, sends the README's JSON requests through
# server reflection, checks the answers (safe writes included: an etag
# conflict, a replayed request id, delete, undelete and purge; the change
# feed: a watch, and list-then-watch from watchToken; queries: `or`, an
# email match that ignores case, the order people read), and stops it with
# SIGTERM.
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
  if [[ -n "${WATCH_PID:-}" ]] && kill -0 "$WATCH_PID" 2>/dev/null; then kill "$WATCH_PID"; wait "$WATCH_PID" || true; fi
  if [[ -n "${PID:-}" ]] && kill -0 "$PID" 2>/dev/null; then kill -TERM "$PID"; wait "$PID" || true; fi
  rm -rf "$DATA_DIR"
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; echo "--- service log ---" >&2; cat "$LOG" >&2; exit 1; }
call() { grpcurl -plaintext -H "authorization: Bearer $(cat "$DATA_DIR/admin.key")" -d "$2" "$ADDR" "$1"; }
# Field of a JSON document on stdin, by jq path.
field() { jq -r "$1"; }
expect() { [[ "$2" == "$3" ]] || fail "$1: expected '$3', got '$2'"; echo "ok: $1"; }
# gRPC codes by name, for the calls that must fail.
declare -A CODE=([INVALID_ARGUMENT]=3 [NOT_FOUND]=5 [ALREADY_EXISTS]=6 [FAILED_PRECONDITION]=9 [ABORTED]=10)
# A call that must fail with the code named; leaves its google.rpc.Status in
# $err as JSON (details decoded through reflection) for reason and metadata.
expect_error() {
  local what=$1 code=$2 method=$3 data=$4
  if err=$(grpcurl -plaintext -format-error -H "authorization: Bearer $(cat "$DATA_DIR/admin.key")" -d "$data" "$ADDR" "$method" 2>&1); then
    fail "$what: expected $code, the call succeeded: $err"
  fi
  [[ "$(jq -r .code <<<"$err" 2>/dev/null)" == "${CODE[$code]}" ]] || fail "$what: expected $code, got: $err"
  echo "ok: $what"
}
# The google.rpc.ErrorInfo of $err.
error_info() { jq -c '.details[] | select(."@type" == "type.googleapis.com/google.rpc.ErrorInfo")' <<<"$err"; }
uuid() { cat /proc/sys/kernel/random/uuid; }
# WatchUsers in the background (at most 30 s), its responses as JSON
# documents into file $1; returns once the first response, which confirms
# the watch, is there: changes made after that are in the feed.
watch_start() {
  local out=$1 data=$2
  : >"$out"
  grpcurl -plaintext -max-time 30 -H "authorization: Bearer $(cat "$DATA_DIR/admin.key")" -d "$data" \
    "$ADDR" users.v1.UsersService/WatchUsers >"$out" 2>"$out.err" &
  WATCH_PID=$!
  for _ in $(seq 1 100); do
    grep -qs resumeToken "$out" && return 0
    kill -0 "$WATCH_PID" 2>/dev/null || fail "WatchUsers ended before its first response: $(cat "$out" "$out.err")"
    sleep 0.1
  done
  fail "WatchUsers sent no first response within 10 s"
}
# The events in watch output $1 so far, one compact JSON line each ("" while
# a response is half written).
watch_events() { jq -s -c '.[].events[]?' "$1" 2>/dev/null || true; }
# Waits until watch output $1 holds $2 events, then ends the watch.
watch_stop_after() {
  local out=$1 count=$2
  for _ in $(seq 1 100); do
    (($(watch_events "$out" | grep -c .) >= count)) && break
    kill -0 "$WATCH_PID" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$WATCH_PID" 2>/dev/null; then kill "$WATCH_PID"; wait "$WATCH_PID" || true; fi
  WATCH_PID=
}

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
for s in users.v1.UsersService users.v1.TenantsService users.v1.KeysService grpc.health.v1.Health; do
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

# Queries as people write them, in a tenant of their own: `or`, an email
# match that ignores case, the order people read, and `valueIn: []`, which
# is no condition (proto3 cannot tell it from no list).
people=$(call users.v1.TenantsService/CreateTenant '{"tenant": {"name": "People", "reference": "people"}}' | field '.tenant.id')
for person in '"firstName": "Zoe", "email": "Mixed.Case@Example.COM"' '"firstName": "anna"' '"firstName": "Émile"' '"firstName": "Bob"'; do
  call users.v1.UsersService/CreateUser "{\"user\": {$person, \"tenantId\": \"$people\"}}" >/dev/null
done
in_people="\"tenantId\": {\"equalTo\": \"$people\"}"
expect "ListUsers with or" \
  "$(call users.v1.UsersService/ListUsers "{\"filter\": {$in_people, \"or\": [{\"firstName\": {\"equalTo\": \"anna\"}}, {\"firstName\": {\"iLike\": \"b%\"}}]}, \"order\": [{\"field\": \"USER_ORDER_FIELD_FIRST_NAME\"}]}" | jq -c '[.data[].firstName]')" \
  '["anna","Bob"]'
expect "ListUsers matches an email ignoring case" \
  "$(call users.v1.UsersService/ListUsers "{\"filter\": {$in_people, \"email\": {\"equalTo\": \"mixed.case@example.com\"}}}" | field '.data[0].firstName')" "Zoe"
expect "ListUsers orders names the way people read them" \
  "$(call users.v1.UsersService/ListUsers "{\"filter\": {$in_people}, \"order\": [{\"field\": \"USER_ORDER_FIELD_FIRST_NAME\"}]}" | jq -c '[.data[].firstName]')" \
  '["anna","Bob","Émile","Zoe"]'
expect "an empty valueIn is no condition" \
  "$(call users.v1.UsersService/ListUsers "{\"filter\": {$in_people, \"firstName\": {\"valueIn\": []}}}" | field '.totalCount')" "4"

# Etags: a write with the etag last read happens once; the same etag again is
# stale, and the error says which etag is current.
etag=$(call users.v1.UsersService/GetUser "{\"id\": \"$id\"}" | field '.user.etag')
[[ -n "$etag" && "$etag" != null ]] || fail "GetUser returns no etag"
walker=$(call users.v1.UsersService/UpdateUser "{\"id\": \"$id\", \"etag\": \"$etag\", \"user\": {\"lastName\": \"Walker\"}}")
expect "UpdateUser with the current etag writes" "$(field '.user.lastName' <<<"$walker")" "Walker"
current=$(field '.user.etag' <<<"$walker")
[[ "$current" != "$etag" ]] || fail "the etag did not change with the update"
expect_error "UpdateUser with a stale etag is ABORTED" ABORTED users.v1.UsersService/UpdateUser \
  "{\"id\": \"$id\", \"etag\": \"$etag\", \"user\": {\"lastName\": \"W\"}}"
expect "... with reason ETAG_MISMATCH" "$(error_info | field '.reason')" "ETAG_MISMATCH"
expect "... in the service's domain" "$(error_info | field '.domain')" "users-service"
expect "... and the current etag" "$(error_info | field '.metadata.etag')" "$current"
expect "... and changes nothing" "$(call users.v1.UsersService/GetUser "{\"id\": \"$id\"}" | field '.user.lastName')" "Walker"
expect "updatedBy names the admin key" "$(field '.user.updatedBy.apiKeyId' <<<"$walker")" "$(cut -d_ -f2 "$DATA_DIR/admin.key")"

# Request ids: a retry of the same request gets the first one's answer and
# makes no second user; the same id with another request is refused.
rid=$(uuid)
create="{\"requestId\": \"$rid\", \"user\": {\"reference\": \"crm-7\", \"email\": \"grace@example.com\"}}"
first=$(call users.v1.UsersService/CreateUser "$create")
grace=$(field '.user.id' <<<"$first")
retried=$(call users.v1.UsersService/CreateUser "$create")
expect "a retried CreateUser with the same requestId returns the same user" "$(field '.user.id' <<<"$retried")" "$grace"
expect "... with the same etag" "$(field '.user.etag' <<<"$retried")" "$(field '.user.etag' <<<"$first")"
expect "... and makes no second user" \
  "$(call users.v1.UsersService/ListUsers '{"filter": {"email": {"equalTo": "grace@example.com"}}}' | field '.totalCount')" "1"
expect_error "the same requestId with another request is INVALID_ARGUMENT" INVALID_ARGUMENT users.v1.UsersService/CreateUser \
  "{\"requestId\": \"$rid\", \"user\": {\"reference\": \"crm-8\"}}"
expect "... with reason REQUEST_ID_REUSED" "$(error_info | field '.reason')" "REQUEST_ID_REUSED"

# Deletion: soft, hidden unless asked for, reserving its reference; undone by
# UndeleteUser; made final by PurgeUser, which only takes a deleted user.
deleted=$(call users.v1.UsersService/DeleteUser "{\"id\": \"$grace\", \"requestId\": \"$(uuid)\"}")
[[ "$(field '.user.deleteTime' <<<"$deleted")" != null ]] || fail "DeleteUser answers no deleteTime: $deleted"
[[ "$(field '.user.expireTime' <<<"$deleted")" > "$(field '.user.deleteTime' <<<"$deleted")" ]] \
  || fail "expireTime is not after deleteTime: $deleted"
echo "ok: DeleteUser answers the user with deleteTime and expireTime"
expect_error "a deleted user is NOT_FOUND" NOT_FOUND users.v1.UsersService/GetUser "{\"id\": \"$grace\"}"
expect "... unless showDeleted" \
  "$(call users.v1.UsersService/GetUser "{\"id\": \"$grace\", \"showDeleted\": true}" | field '.user.deleteTime')" \
  "$(field '.user.deleteTime' <<<"$deleted")"
expect "ListUsers leaves it out" \
  "$(call users.v1.UsersService/ListUsers '{"filter": {"reference": {"equalTo": "crm-7"}}}' | field '.totalCount')" "0"
expect_error "its reference stays reserved" ALREADY_EXISTS users.v1.UsersService/CreateUser '{"user": {"reference": "crm-7"}}'
expect_error "deleting it again is NOT_FOUND" NOT_FOUND users.v1.UsersService/DeleteUser "{\"id\": \"$grace\"}"
call users.v1.UsersService/DeleteUser "{\"id\": \"$grace\", \"allowMissing\": true}" >/dev/null
echo "ok: ... and OK with allowMissing"
restored=$(call users.v1.UsersService/UndeleteUser "{\"id\": \"$grace\"}")
expect "UndeleteUser restores it" "$(field '.user.deleteTime' <<<"$restored")" "null"
expect "... visible again" "$(call users.v1.UsersService/GetUser "{\"id\": \"$grace\"}" | field '.user.email')" "grace@example.com"
expect_error "PurgeUser of a user not deleted is FAILED_PRECONDITION" FAILED_PRECONDITION \
  users.v1.UsersService/PurgeUser "{\"id\": \"$grace\"}"
call users.v1.UsersService/DeleteUser "{\"id\": \"$grace\"}" >/dev/null
expect "PurgeUser erases a deleted user" \
  "$(call users.v1.UsersService/PurgeUser "{\"id\": \"$grace\", \"requestId\": \"$(uuid)\"}" | field '.id')" "$grace"
expect_error "... even for showDeleted" NOT_FOUND users.v1.UsersService/GetUser "{\"id\": \"$grace\", \"showDeleted\": true}"
expect_error "a replay of the request that created it is NOT_FOUND" NOT_FOUND users.v1.UsersService/CreateUser "$create"
expect "... and its reference is free again" \
  "$(call users.v1.UsersService/CreateUser '{"user": {"reference": "crm-7"}}' | field '.user.reference')" "crm-7"

tenant=$(call users.v1.TenantsService/CreateTenant '{"tenant": {"name": "Acme", "reference": "acme"}}')
expect "CreateTenant returns the tenant" "$(field '.tenant.reference' <<<"$tenant")" "acme"
tenant_id=$(field '.tenant.id' <<<"$tenant")
expect "GetTenant" "$(call users.v1.TenantsService/GetTenant "{\"id\": \"$tenant_id\"}" | field '.tenant.name')" "Acme"

# A tenant goes with its users, and comes back with them.
ada=$(call users.v1.UsersService/CreateUser "{\"user\": {\"email\": \"ada@acme.example\", \"tenantId\": \"$tenant_id\"}}" | field '.user.id')
call users.v1.TenantsService/DeleteTenant "{\"id\": \"$tenant_id\"}" >/dev/null
expect_error "DeleteTenant hides its users" NOT_FOUND users.v1.UsersService/GetUser "{\"id\": \"$ada\"}"
call users.v1.TenantsService/UndeleteTenant "{\"id\": \"$tenant_id\"}" >/dev/null
expect "UndeleteTenant restores them" "$(call users.v1.UsersService/GetUser "{\"id\": \"$ada\"}" | field '.user.email')" "ada@acme.example"
expect_error "the default tenant cannot be deleted" FAILED_PRECONDITION users.v1.TenantsService/DeleteTenant "{\"id\": \"$default_tenant\"}"

# The change feed: a watch's first response is its position, without events;
# each change after it is one event, with the user as the change left it.
watch=$DATA_DIR/watch.json
watch_start "$watch" '{}'
linus=$(call users.v1.UsersService/CreateUser "{\"requestId\": \"$(uuid)\", \"user\": {\"email\": \"linus@example.com\"}}" | field '.user.id')
watch_stop_after "$watch" 1
[[ "$(jq -s -c '.[0]' "$watch")" == '{"resumeToken":'* ]] || fail "the first response is not a position only: $(cat "$watch")"
echo "ok: WatchUsers answers first with its position"
events=$(watch_events "$watch")
expect "WatchUsers sends one event for a CreateUser" "$(grep -c . <<<"$events")" "1"
expect "... of type CREATED" "$(field '.type' <<<"$events")" "USER_EVENT_TYPE_CREATED"
expect "... with the user" "$(field '.user.id' <<<"$events")" "$linus"
expect "... and who made it" "$(field '.actor.apiKeyName' <<<"$events")" "bootstrap"

# List, then watch from the list's watchToken: the changes the list does not
# show, also those made before the watch started, and nothing it does show.
listed=$(call users.v1.UsersService/ListUsers '{"filter": {"email": {"equalTo": "linus@example.com"}}}')
expect "ListUsers shows the created user" "$(field '.data[0].id' <<<"$listed")" "$linus"
watch_token=$(field '.watchToken' <<<"$listed")
[[ -n "$watch_token" && "$watch_token" != null ]] || fail "ListUsers answers no watchToken: $listed"
call users.v1.UsersService/UpdateUser "{\"id\": \"$linus\", \"requestId\": \"$(uuid)\", \"user\": {\"lastName\": \"T\"}}" >/dev/null
watch=$DATA_DIR/watch-from-list.json
watch_start "$watch" "{\"resumeToken\": \"$watch_token\"}"
call users.v1.UsersService/DeactivateUser "{\"id\": \"$linus\", \"requestId\": \"$(uuid)\"}" >/dev/null
watch_stop_after "$watch" 2
expect "watching from ListUsers' watchToken sends the changes after the list, in order" \
  "$(watch_events "$watch" | jq -r '"\(.type) \(.user.id)"' | paste -sd,)" \
  "USER_EVENT_TYPE_UPDATED $linus,USER_EVENT_TYPE_DEACTIVATED $linus"

if out=$(call users.v1.UsersService/CreateUser '{"user": {"email": "nope", "phone": "123"}}' 2>&1); then
  fail "an invalid user was accepted"
fi
grep -q "InvalidArgument" <<<"$out" || fail "expected InvalidArgument, got: $out"
grep -q "user.email" <<<"$out" && grep -q "user.phone" <<<"$out" || fail "violations missing: $out"
echo "ok: invalid input is INVALID_ARGUMENT listing every field"

if out=$(call users.v1.UsersService/GetUser "{\"id\": \"$tenant_id\"}" 2>&1); then fail "unknown id found"; fi
grep -q "NotFound" <<<"$out" || fail "expected NotFound, got: $out"
echo "ok: unknown id is NOT_FOUND"

# Keys over the API: a viewer key of the default tenant that expires in a day.
expires=$(date -u -d '+1 day' +%Y-%m-%dT%H:%M:%SZ)
made=$(call users.v1.KeysService/CreateKey "{\"name\": \"dashboard\", \"role\": \"KEY_ROLE_VIEWER\", \"tenantId\": \"$default_tenant\", \"expireTime\": \"$expires\"}")
viewer_token=$(field '.token' <<<"$made")
viewer_id=$(field '.key.id' <<<"$made")
grpcurl -plaintext -H "authorization: Bearer $viewer_token" -d '{}' "$ADDR" users.v1.UsersService/ListUsers >/dev/null \
  || fail "the key made over the API does not work"
expect "ListKeys shows the key made" \
  "$(call users.v1.KeysService/ListKeys '{"pageSize": 1000}' | jq -r --arg id "$viewer_id" '.keys[] | select(.id == $id) | .name')" "dashboard"
call users.v1.KeysService/RevokeKey "{\"id\": \"$viewer_id\"}" >/dev/null
for _ in $(seq 1 50); do
  grpcurl -plaintext -H "authorization: Bearer $viewer_token" -d '{}' "$ADDR" users.v1.UsersService/ListUsers >/dev/null 2>&1 || break
  sleep 0.1
done
if grpcurl -plaintext -H "authorization: Bearer $viewer_token" -d '{}' "$ADDR" users.v1.UsersService/ListUsers >/dev/null 2>&1; then
  fail "a revoked key still works"
fi
echo "ok: a key revoked over the API is refused"

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
if grep -q "$(cut -d_ -f3 <<<"$viewer_token")" "$LOG"; then fail "a token made by CreateKey is in the log"; fi
echo "ok: no token in the log"
echo "grpcurl end-to-end: all checks passed"
