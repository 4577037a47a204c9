"""The Python client scenario, against a live users-service (see conftest.py).

Tests run in file order and share one server; the last one stops it with
SIGTERM and checks that it exits 0. Every write sends a request_id, as the
README asks of any write a client may retry.
"""

from __future__ import annotations

import uuid

import grpc
import pytest
from grpc_status import rpc_status

ROQ_REFERENCE = "8d04d09a-8ff8-4393-840d-c69f3f1f7dfa"
TIMEOUT = 10  # seconds, per call
WATCH_TIMEOUT = 60  # seconds, a whole WatchUsers stream (heartbeats come every 10 s)


def request_id() -> str:
    """A fresh request id: one per logical write, sent again on each of its retries."""
    return str(uuid.uuid4())


def roq_user(pb):
    """The ROQ API's example user, as sent (locale in non-canonical case)."""
    return pb.users.User(
        reference=ROQ_REFERENCE,
        email="",
        phone="+15550001234",
        first_name="Anna",
        last_name="W",
        locale="en-Us",
        timezone="Asia/Bangkok",
        is_opted_in=False,
        active=True,
    )


def rpc_error(call, request, metadata):
    """Make a call that must fail; return the grpc.RpcError (also a grpc.Call)."""
    with pytest.raises(grpc.RpcError) as excinfo:
        call(request, metadata=metadata, timeout=TIMEOUT)
    return excinfo.value


def details(pb, error, kind):
    """The details of one google.rpc type in the status of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status details in {error.code()}: {error.details()}"
    assert status.code == error.code().value[0]
    found = []
    for any_detail in status.details:
        if any_detail.Is(kind.DESCRIPTOR):
            message = kind()
            any_detail.Unpack(message)
            found.append(message)
    return found


@pytest.fixture(scope="module")
def roq(pb, users, auth):
    """The ROQ user, created once; the created user as the server returned it."""
    created = users.CreateUser(
        pb.users.CreateUserRequest(user=roq_user(pb), request_id=request_id()), metadata=auth, timeout=TIMEOUT
    )
    return created.user


def test_create_roq_user(roq):
    assert str(uuid.UUID(roq.id)) == roq.id, f"id is not a canonical UUID: {roq.id!r}"
    assert roq.locale == "en-US"
    assert roq.synced is True
    assert roq.reference == ROQ_REFERENCE
    assert roq.email == ""
    assert roq.HasField("phone") and roq.phone == "+15550001234"
    assert roq.first_name == "Anna" and roq.last_name == "W"
    assert roq.HasField("timezone") and roq.timezone == "Asia/Bangkok"
    assert roq.is_opted_in is False
    assert roq.HasField("active") and roq.active is True
    uuid.UUID(roq.tenant_id)  # the default tenant
    assert roq.HasField("created_at") and roq.HasField("updated_at")
    assert roq.etag
    assert roq.updated_by.api_key_id and not roq.updated_by.user_id  # made with the admin key


def test_get_user(pb, users, auth, roq):
    got = users.GetUser(pb.users.GetUserRequest(id=roq.id), metadata=auth, timeout=TIMEOUT).user
    assert got == roq


def test_update_first_name_only(pb, users, auth, roq):
    before = users.GetUser(pb.users.GetUserRequest(id=roq.id), metadata=auth, timeout=TIMEOUT).user
    after = users.UpdateUser(
        pb.users.UpdateUserRequest(
            id=roq.id,
            user=pb.users.UserUpdate(first_name="Anna-Maria"),
            etag=before.etag,  # only if nobody changed the user since we read it
            request_id=request_id(),
        ),
        metadata=auth,
        timeout=TIMEOUT,
    ).user
    assert after.first_name == "Anna-Maria"
    assert after.updated_at.ToDatetime() >= before.updated_at.ToDatetime()
    assert after.etag != before.etag
    # Every other field is unchanged.
    expected = type(before)()
    expected.CopyFrom(before)
    expected.first_name = "Anna-Maria"
    expected.ClearField("updated_at")
    expected.ClearField("etag")
    compared = type(after)()
    compared.CopyFrom(after)
    compared.ClearField("updated_at")
    compared.ClearField("etag")
    assert compared == expected
    # And it is stored.
    assert users.GetUser(pb.users.GetUserRequest(id=roq.id), metadata=auth, timeout=TIMEOUT).user == after


def test_deactivate_and_reactivate_are_idempotent(pb, users, auth, roq):
    def deactivate():
        request = pb.users.DeactivateUserRequest(id=roq.id, request_id=request_id())
        return users.DeactivateUser(request, metadata=auth, timeout=TIMEOUT).user

    def reactivate():
        request = pb.users.ReactivateUserRequest(id=roq.id, request_id=request_id())
        return users.ReactivateUser(request, metadata=auth, timeout=TIMEOUT).user

    first = deactivate()
    assert first.active is False
    second = deactivate()
    assert second.active is False
    assert second.updated_at == first.updated_at, "a second deactivate changed updatedAt"
    assert second == first

    back = reactivate()
    assert back.active is True
    again = reactivate()
    assert again.active is True
    assert again.updated_at == back.updated_at, "a second reactivate changed updatedAt"


def test_list_with_reference_filter(pb, users, auth, roq):
    reply = users.ListUsers(
        pb.users.ListUsersRequest(
            limit=10,
            offset=0,
            filter=pb.users.UserFilter(reference=pb.common.StringFilter(equal_to=ROQ_REFERENCE)),
        ),
        metadata=auth,
        timeout=TIMEOUT,
    )
    assert reply.HasField("total_count") and reply.total_count == 1
    assert [u.id for u in reply.data] == [roq.id]
    assert reply.data[0].first_name == "Anna-Maria"  # as updated above
    assert reply.next_page_token == ""


def test_list_paging_with_next_page_token(pb, users, auth):
    prefix = f"paging-{uuid.uuid4()}-"
    created = set()
    for i in range(5):
        user = pb.users.User(reference=f"{prefix}{i}", first_name=f"Page{i}", last_name="Walker")
        request = pb.users.CreateUserRequest(user=user, request_id=request_id())
        created.add(users.CreateUser(request, metadata=auth, timeout=TIMEOUT).user.id)
    assert len(created) == 5

    user_filter = pb.users.UserFilter(reference=pb.common.StringFilter(like=f"{prefix}%"))
    seen, pages, token = [], [], ""
    for _ in range(10):  # 5 users at 2 a page: 3 pages; bounded in case the token never empties
        reply = users.ListUsers(
            pb.users.ListUsersRequest(limit=2, filter=user_filter, page_token=token),
            metadata=auth,
            timeout=TIMEOUT,
        )
        assert len(reply.data) <= 2
        pages.append(len(reply.data))
        seen.extend(u.id for u in reply.data)
        token = reply.next_page_token
        if not token:
            break
    else:
        pytest.fail(f"next_page_token never became empty; pages so far: {pages}")
    assert len(seen) == len(set(seen)), f"a user was listed twice: {seen}"
    assert set(seen) == created
    assert pages[:2] == [2, 2]


def test_validation_error_lists_every_bad_field(pb, users, auth):
    bad = pb.users.User(reference=f"bad-{uuid.uuid4()}", email="not an email", phone="12-not-a-phone")
    error = rpc_error(users.CreateUser, pb.users.CreateUserRequest(user=bad, request_id=request_id()), auth)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    (bad_request,) = details(pb, error, pb.error_details.BadRequest)
    fields = {v.field for v in bad_request.field_violations}
    assert {"user.email", "user.phone"} <= fields, fields
    assert all(v.description for v in bad_request.field_violations)
    (info,) = details(pb, error, pb.error_details.ErrorInfo)
    assert info.reason == "INVALID_ARGUMENT"


def test_unknown_id_is_not_found(pb, users, auth):
    error = rpc_error(users.GetUser, pb.users.GetUserRequest(id=str(uuid.uuid4())), auth)
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_duplicate_reference_is_already_exists(pb, users, auth, roq):
    duplicate = pb.users.User(reference=ROQ_REFERENCE, first_name="Other")
    error = rpc_error(users.CreateUser, pb.users.CreateUserRequest(user=duplicate, request_id=request_id()), auth)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    (info,) = details(pb, error, pb.error_details.ErrorInfo)
    assert info.reason == "ALREADY_EXISTS"
    assert info.metadata["field"] == "reference"


def test_retry_with_the_same_request_id_returns_the_same_user(pb, users, auth):
    """A write sent again with its request_id, as after a lost reply, has no second effect."""
    reference = f"retry-{uuid.uuid4()}"
    request = pb.users.CreateUserRequest(
        user=pb.users.User(reference=reference, first_name="Grace", last_name="Hopper"),
        request_id=request_id(),
    )
    first = users.CreateUser(request, metadata=auth, timeout=TIMEOUT).user
    retry = users.CreateUser(request, metadata=auth, timeout=TIMEOUT).user
    assert retry.id == first.id
    assert retry == first, "the retry did not get the first response (same etag, same times)"
    listed = users.ListUsers(
        pb.users.ListUsersRequest(filter=pb.users.UserFilter(reference=pb.common.StringFilter(equal_to=reference))),
        metadata=auth,
        timeout=TIMEOUT,
    )
    assert listed.total_count == 1, "the retry made a second user"


def test_authentication(pb, users, auth):
    request = pb.users.ListUsersRequest(limit=1)
    for metadata in [None, (("authorization", "Bearer not-a-real-token"),), (("authorization", "Basic abc"),)]:
        error = rpc_error(users.ListUsers, request, metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
    reply = users.ListUsers(request, metadata=auth, timeout=TIMEOUT)
    assert len(reply.data) == 1


def read_events(stream, count):
    """The next `count` events of a watch, across responses and heartbeats; fails if those bring more.

    Blocks until they come, or until the watch's deadline (WATCH_TIMEOUT) ends it.
    """
    events = []
    while len(events) < count:
        events.extend(next(stream).events)
    assert len(events) == count, f"expected {count} events, got {[(e.type, e.user.id) for e in events]}"
    return events


def start_watch(users, auth, request):
    """A watch, once its first response (no events, a position) confirms it."""
    stream = users.WatchUsers(request, metadata=auth, timeout=WATCH_TIMEOUT)
    first = next(stream)
    assert not first.events, "the first response is the position only"
    assert first.resume_token
    return stream


def test_watch_resumes_from_the_last_event_with_nothing_lost_or_repeated(pb, users, channel, auth):
    """Watch, disconnect, change more, resume from the last event's resume_token."""
    Type = pb.users.UserEventType
    tenants = pb.tenants_grpc.TenantsServiceStub(channel)
    tenant = tenants.CreateTenant(
        pb.tenants.CreateTenantRequest(
            tenant=pb.tenants.Tenant(name="Watchers", reference=f"watch-{uuid.uuid4()}"), request_id=request_id()
        ),
        metadata=auth,
        timeout=TIMEOUT,
    ).tenant
    # Its own tenant: every event of these watches is one of this test's changes.
    watch_request = pb.users.WatchUsersRequest(tenant_id=tenant.id)

    def create(first_name):
        user = pb.users.User(first_name=first_name, tenant_id=tenant.id)
        request = pb.users.CreateUserRequest(user=user, request_id=request_id())
        return users.CreateUser(request, metadata=auth, timeout=TIMEOUT).user.id

    def update(user_id, **fields):
        request = pb.users.UpdateUserRequest(id=user_id, user=pb.users.UserUpdate(**fields), request_id=request_id())
        users.UpdateUser(request, metadata=auth, timeout=TIMEOUT)

    def deactivate(user_id):
        request = pb.users.DeactivateUserRequest(id=user_id, request_id=request_id())
        users.DeactivateUser(request, metadata=auth, timeout=TIMEOUT)

    def reactivate(user_id):
        request = pb.users.ReactivateUserRequest(id=user_id, request_id=request_id())
        users.ReactivateUser(request, metadata=auth, timeout=TIMEOUT)

    stream = start_watch(users, auth, watch_request)
    try:
        ada = create("Ada")
        bob = create("Bob")
        update(ada, last_name="Lovelace")
        deactivate(bob)
        expected = [
            (ada, Type.USER_EVENT_TYPE_CREATED),
            (bob, Type.USER_EVENT_TYPE_CREATED),
            (ada, Type.USER_EVENT_TYPE_UPDATED),
            (bob, Type.USER_EVENT_TYPE_DEACTIVATED),
        ]
        seen = read_events(stream, len(expected))
    finally:
        stream.cancel()  # disconnect

    updated = seen[2]
    assert list(updated.changed_fields.paths) == ["last_name"]
    assert updated.user.last_name == "Lovelace"
    assert seen[3].user.HasField("active") and seen[3].user.active is False
    assert all(e.resume_token for e in seen)

    # While nobody watches.
    update(bob, first_name="Robert")
    deactivate(ada)
    reactivate(bob)
    cleo = create("Cleo")
    expected += [
        (bob, Type.USER_EVENT_TYPE_UPDATED),
        (ada, Type.USER_EVENT_TYPE_DEACTIVATED),
        (bob, Type.USER_EVENT_TYPE_REACTIVATED),
        (cleo, Type.USER_EVENT_TYPE_CREATED),
    ]

    resume = pb.users.WatchUsersRequest(tenant_id=tenant.id, resume_token=seen[-1].resume_token)
    resumed = start_watch(users, auth, resume)
    try:
        # One change after the resumption marks the end: every event before it
        # in commit order has arrived by the time it does, duplicates included.
        update(cleo, last_name="Marker")
        expected.append((cleo, Type.USER_EVENT_TYPE_UPDATED))
        seen += read_events(resumed, len(expected) - len(seen))
    finally:
        resumed.cancel()

    got = [(e.user.id, e.type) for e in seen]
    assert got == expected, f"every change once, in commit order (so in order per user): {got}"
    event_ids = [e.event_id for e in seen]
    assert all(event_ids) and len(set(event_ids)) == len(event_ids), f"an event came twice: {event_ids}"
    assert seen[4].user.first_name == "Robert"
    assert all(e.user.tenant_id == tenant.id for e in seen)


def test_sigterm_stops_the_server_with_exit_0(server):
    """Last: SIGTERM ends the server cleanly (the fixture checks it again at teardown)."""
    code = server.stop()
    assert code == 0, f"exit code {code}\n{server.log_tail()}"
