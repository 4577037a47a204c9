// End-to-end test of the generated TypeScript client against the real
// users-service binary: its own embedded Postgres in a fresh data dir, a free
// port, the bootstrap admin key, and a clean SIGTERM shutdown at the end.
// Every write sends a requestId, as the README asks of any write a client
// may retry.
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { clone, create, equals } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import { createUsersServiceClients, type UsersServiceClients } from "../src/client.js";
import {
  UserEventType,
  UserSchema,
  type User,
  type UserEvent,
  type WatchUsersResponse,
} from "../src/gen/users/v1/users_pb.js";
import { BadRequestSchema, ErrorInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";
import { expectError, startServer, stopCleanly, stopServer, tail, type Server } from "./server.js";

const ROQ_REFERENCE = "8d04d09a-8ff8-4393-840d-c69f3f1f7dfa";
/** A fresh request id: one per logical write, sent again on each of its retries. */
const requestId = (): string => randomUUID();
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
/** Deadline of a whole WatchUsers stream (heartbeats come every 10 s). */
const WATCH_TIMEOUT_MS = 60_000;

function millis(user: User, field: "createdAt" | "updatedAt"): number {
  const ts = user[field];
  assert.ok(ts, `${field} is missing`);
  return timestampDate(ts).getTime();
}

/**
 * The next `count` events of a watch, across responses and heartbeats; fails
 * if those responses bring more. Waits until they come, or until the watch's
 * deadline (WATCH_TIMEOUT_MS) ends it.
 */
async function readEvents(stream: AsyncIterator<WatchUsersResponse>, count: number): Promise<UserEvent[]> {
  const events: UserEvent[] = [];
  while (events.length < count) {
    const next = await stream.next();
    assert.ok(!next.done, `the watch ended after ${events.length} of ${count} events`);
    events.push(...next.value.events);
  }
  assert.equal(events.length, count, "more events than the changes made");
  return events;
}

describe("users-service TypeScript client", () => {
  let server: Server | undefined;
  let stopped = false;
  let client: UsersServiceClients;
  let roq: User; // the ROQ example user as created

  before(async () => {
    server = await startServer();
    client = createUsersServiceClients({ baseUrl: server.baseUrl, apiKey: server.adminKey });
  });

  after(async () => {
    if (server && !stopped) {
      const result = await stopServer(server);
      console.error(`server stopped (${JSON.stringify(result)}), log kept in ${server.logFile}:\n${tail(server.logFile)}`);
    }
  });

  it("creates the ROQ example user", async () => {
    const { user } = await client.users.createUser({
      user: {
        reference: ROQ_REFERENCE,
        email: "",
        phone: "+15550001234",
        firstName: "Anna",
        lastName: "W",
        locale: "en-Us",
        timezone: "Asia/Bangkok",
        isOptedIn: false,
        active: true,
      },
      requestId: requestId(),
    });
    assert.ok(user);
    assert.match(user.id, UUID);
    assert.equal(user.reference, ROQ_REFERENCE);
    assert.equal(user.email, "");
    assert.equal(user.phone, "+15550001234");
    assert.equal(user.firstName, "Anna");
    assert.equal(user.lastName, "W");
    assert.equal(user.locale, "en-US"); // canonical
    assert.equal(user.timezone, "Asia/Bangkok");
    assert.equal(user.isOptedIn, false);
    assert.equal(user.active, true);
    assert.equal(user.synced, true);
    assert.match(user.tenantId, UUID); // the default tenant
    assert.ok(user.createdAt && user.updatedAt);
    assert.ok(user.etag.length > 0);
    assert.ok(user.updatedBy?.apiKeyId, "updatedBy names no API key"); // made with the admin key
    roq = user;
  });

  it("gets the user by id", async () => {
    const { user } = await client.users.getUser({ id: roq.id });
    assert.ok(user);
    assert.ok(equals(UserSchema, user, roq), "GetUser differs from CreateUser's answer");
  });

  it("updates the first name only", async () => {
    const { user } = await client.users.updateUser({
      id: roq.id,
      user: { firstName: "Anna-Maria" },
      etag: roq.etag, // only if nobody changed the user since we read it
      requestId: requestId(),
    });
    assert.ok(user);
    assert.equal(user.firstName, "Anna-Maria");
    assert.ok(millis(user, "updatedAt") >= millis(roq, "updatedAt"));
    assert.notEqual(user.etag, roq.etag);
    const expected = clone(UserSchema, roq);
    expected.firstName = "Anna-Maria";
    expected.updatedAt = user.updatedAt;
    expected.etag = user.etag;
    assert.ok(equals(UserSchema, user, expected), "fields other than firstName changed");
    roq = user;
  });

  it("deactivates idempotently and reactivates", async () => {
    const first = (await client.users.deactivateUser({ id: roq.id, requestId: requestId() })).user;
    assert.ok(first);
    assert.equal(first.active, false);
    const second = (await client.users.deactivateUser({ id: roq.id, requestId: requestId() })).user;
    assert.ok(second);
    assert.equal(second.active, false);
    assert.equal(millis(second, "updatedAt"), millis(first, "updatedAt"), "second deactivate changed updatedAt");
    assert.ok(equals(UserSchema, second, first));

    const again = (await client.users.reactivateUser({ id: roq.id, requestId: requestId() })).user;
    assert.ok(again);
    assert.equal(again.active, true);
    assert.equal(again.firstName, "Anna-Maria");
    roq = again;
  });

  it("lists with a reference filter", async () => {
    const page = await client.users.listUsers({
      limit: 10,
      filter: { reference: { equalTo: ROQ_REFERENCE } },
    });
    assert.equal(page.totalCount, 1n);
    assert.equal(page.data.length, 1);
    assert.equal(page.data[0].id, roq.id);
    assert.equal(page.nextPageToken, "");
  });

  it("pages with limit 2 and nextPageToken", async () => {
    const prefix = `ts-page-${randomUUID().slice(0, 8)}-`;
    const created = new Set<string>();
    for (let i = 0; i < 5; i++) {
      const { user } = await client.users.createUser({
        user: { reference: `${prefix}${i}`, email: `${prefix}${i}@example.com`, firstName: `Page ${i}` },
        requestId: requestId(),
      });
      assert.ok(user);
      created.add(user.id);
    }
    const filter = { reference: { like: `${prefix}%` } };
    const seen: string[] = [];
    let pageToken = "";
    let pages = 0;
    do {
      const page = await client.users.listUsers({ limit: 2, filter, pageToken });
      pages++;
      assert.ok(page.data.length <= 2);
      if (pages === 1) assert.equal(page.totalCount, 5n);
      seen.push(...page.data.map((u) => u.id));
      pageToken = page.nextPageToken;
      assert.ok(pages <= 5, "paging does not end");
    } while (pageToken !== "");
    assert.equal(seen.length, 5, "a user was seen twice or missed");
    assert.deepEqual(new Set(seen), created);
  });

  it("reports every invalid field as google.rpc.BadRequest", async () => {
    const err = await expectError(Code.InvalidArgument, () =>
      client.users.createUser({ user: { email: "not an email", phone: "12" }, requestId: requestId() }),
    );
    const badRequests = err.findDetails(BadRequestSchema);
    assert.equal(badRequests.length, 1);
    const fields = badRequests[0].fieldViolations.map((v) => v.field).sort();
    assert.deepEqual(fields, ["user.email", "user.phone"]);
    for (const v of badRequests[0].fieldViolations) assert.ok(v.description.length > 0);
    const infos = err.findDetails(ErrorInfoSchema);
    assert.equal(infos[0]?.reason, "INVALID_ARGUMENT");
  });

  it("answers NOT_FOUND for an unknown id", async () => {
    await expectError(Code.NotFound, () => client.users.getUser({ id: randomUUID() }));
  });

  it("answers ALREADY_EXISTS for a duplicate reference", async () => {
    const err = await expectError(Code.AlreadyExists, () =>
      client.users.createUser({ user: { reference: ROQ_REFERENCE, firstName: "Dup" }, requestId: requestId() }),
    );
    const infos = err.findDetails(ErrorInfoSchema);
    assert.equal(infos.length, 1);
    assert.equal(infos[0].reason, "ALREADY_EXISTS");
    assert.equal(infos[0].metadata.field, "reference");
  });

  it("returns the same user to a retry with the same requestId", async () => {
    // As after a lost reply: the very same request, with the same requestId, again.
    const reference = `ts-retry-${randomUUID()}`;
    const request = { user: { reference, firstName: "Grace", lastName: "Hopper" }, requestId: requestId() };
    const first = (await client.users.createUser(request)).user;
    const retry = (await client.users.createUser(request)).user;
    assert.ok(first && retry);
    assert.equal(retry.id, first.id);
    assert.ok(equals(UserSchema, retry, first), "the retry did not get the first response (same etag, same times)");
    const page = await client.users.listUsers({ filter: { reference: { equalTo: reference } } });
    assert.equal(page.totalCount, 1n, "the retry made a second user");
  });

  it("answers UNAUTHENTICATED without the API key", async () => {
    assert.ok(server);
    const anonymous = createUsersServiceClients({ baseUrl: server.baseUrl });
    await expectError(Code.Unauthenticated, () => anonymous.users.listUsers({ limit: 1 }));
    await expectError(Code.Unauthenticated, () => anonymous.users.getUser({ id: roq.id }));
  });

  it("watches, disconnects, and resumes from the last event's resumeToken with nothing lost or repeated", async () => {
    const { tenant } = await client.tenants.createTenant({
      tenant: { name: "Watchers", reference: `ts-watch-${randomUUID()}` },
      requestId: requestId(),
    });
    assert.ok(tenant);
    // Its own tenant: every event of these watches is one of this test's changes.
    const tenantId = tenant.id;
    /** A watch, once its first response (no events, a position) confirms it. */
    const startWatch = async (resumeToken = "") => {
      const abort = new AbortController();
      const stream = client.users
        .watchUsers({ tenantId, resumeToken }, { signal: abort.signal, timeoutMs: WATCH_TIMEOUT_MS })
        [Symbol.asyncIterator]();
      const first = await stream.next();
      assert.ok(!first.done, "the watch ended before its first response");
      assert.equal(first.value.events.length, 0, "the first response is the position only");
      assert.ok(first.value.resumeToken.length > 0);
      /** Cancels the watch, then reads on to its end (CANCELED), which also clears its deadline's timer. */
      const disconnect = async () => {
        abort.abort();
        try {
          while (!(await stream.next()).done);
        } catch {
          // Canceled, as asked.
        }
      };
      return { stream, disconnect };
    };
    const createUser = async (firstName: string): Promise<string> => {
      const { user } = await client.users.createUser({ user: { firstName, tenantId }, requestId: requestId() });
      assert.ok(user);
      return user.id;
    };
    const update = (id: string, user: { firstName?: string; lastName?: string }) =>
      client.users.updateUser({ id, user, requestId: requestId() });
    const deactivate = (id: string) => client.users.deactivateUser({ id, requestId: requestId() });
    const reactivate = (id: string) => client.users.reactivateUser({ id, requestId: requestId() });

    const watch = await startWatch();
    let ada: string, bob: string, seen: UserEvent[];
    const expected: [string, UserEventType][] = [];
    try {
      ada = await createUser("Ada");
      bob = await createUser("Bob");
      await update(ada, { lastName: "Lovelace" });
      await deactivate(bob);
      expected.push(
        [ada, UserEventType.CREATED],
        [bob, UserEventType.CREATED],
        [ada, UserEventType.UPDATED],
        [bob, UserEventType.DEACTIVATED],
      );
      seen = await readEvents(watch.stream, expected.length);
    } finally {
      await watch.disconnect();
    }
    assert.deepEqual(seen[2].changedFields?.paths, ["last_name"]);
    assert.equal(seen[2].user?.lastName, "Lovelace");
    assert.equal(seen[3].user?.active, false);
    for (const e of seen) assert.ok(e.resumeToken.length > 0, "an event without resumeToken");

    // While nobody watches.
    await update(bob, { firstName: "Robert" });
    await deactivate(ada);
    await reactivate(bob);
    const cleo = await createUser("Cleo");
    expected.push(
      [bob, UserEventType.UPDATED],
      [ada, UserEventType.DEACTIVATED],
      [bob, UserEventType.REACTIVATED],
      [cleo, UserEventType.CREATED],
    );

    const resumed = await startWatch(seen[seen.length - 1].resumeToken);
    try {
      // One change after the resumption marks the end: every event before it
      // in commit order has arrived by the time it does, duplicates included.
      await update(cleo, { lastName: "Marker" });
      expected.push([cleo, UserEventType.UPDATED]);
      seen.push(...(await readEvents(resumed.stream, expected.length - seen.length)));
    } finally {
      await resumed.disconnect();
    }

    const got = seen.map((e): [string, UserEventType] => [e.user?.id ?? "", e.type]);
    assert.deepEqual(got, expected, "every change once, in commit order (so in order per user)");
    const eventIds = seen.map((e) => e.eventId);
    assert.ok(eventIds.every((id) => id.length > 0), "an event without eventId");
    assert.equal(new Set(eventIds).size, eventIds.length, `an event came twice: ${eventIds.join(", ")}`);
    assert.equal(seen[4].user?.firstName, "Robert");
    for (const e of seen) assert.equal(e.user?.tenantId, tenantId);
  });

  it("stops on SIGTERM with exit code 0", async () => {
    assert.ok(server);
    stopped = true;
    await stopCleanly(server);
  });
});
