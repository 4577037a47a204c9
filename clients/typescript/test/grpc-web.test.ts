// The users.v1 API through gRPC-Web from Node, as a browser would call it
// (Connect's gRPC-Web transport over HTTP/1.1, and once over HTTP/2), against
// the real users-service binary: users of their own tenant, a read, a filtered
// list, rich error details, and no credentials.
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { equals } from "@bufbuild/protobuf";
import { Code, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-node";
import { bearerAuth } from "../src/client.js";
import { UserSchema, UsersService, type User } from "../src/gen/users/v1/users_pb.js";
import { TenantsService } from "../src/gen/users/v1/tenants_pb.js";
import { BadRequestSchema, ErrorInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";
import { expectError, startServer, stopCleanly, stopServer, tail, type Server } from "./server.js";

const requestId = (): string => randomUUID();
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** Clients over gRPC-Web (application/grpc-web+proto), with the key if given. */
function grpcWebClients(baseUrl: string, apiKey: string | undefined, httpVersion: "1.1" | "2" = "1.1") {
  const interceptors: Interceptor[] = apiKey === undefined ? [] : [bearerAuth(apiKey)];
  const transport = createGrpcWebTransport({ baseUrl, httpVersion, interceptors });
  return {
    users: createClient(UsersService, transport),
    tenants: createClient(TenantsService, transport),
  };
}

describe("users-service over gRPC-Web (Node, HTTP/1.1)", () => {
  let server: Server | undefined;
  let stopped = false;
  let users: Client<typeof UsersService>;
  let tenantId: string;
  const created: User[] = [];
  const suffix = randomUUID().slice(0, 8);

  before(async () => {
    server = await startServer();
    const clients = grpcWebClients(server.baseUrl, server.adminKey);
    users = clients.users;
    const { tenant } = await clients.tenants.createTenant({
      tenant: { name: "gRPC-Web", reference: `ts-grpc-web-${suffix}` },
      requestId: requestId(),
    });
    assert.ok(tenant);
    assert.match(tenant.id, UUID);
    tenantId = tenant.id;
  });

  after(async () => {
    if (server && !stopped) {
      const result = await stopServer(server);
      console.error(`server stopped (${JSON.stringify(result)}), log kept in ${server.logFile}:\n${tail(server.logFile)}`);
    }
  });

  it("creates two users in the tenant, with response headers", async () => {
    for (const [firstName, lastName] of [["Ada", "Lovelace"], ["Alan", "Turing"]]) {
      let requestIdHeader: string | null = null;
      const { user } = await users.createUser(
        {
          user: {
            tenantId,
            reference: `web-${firstName.toLowerCase()}-${suffix}`,
            email: `${firstName.toLowerCase()}.${suffix}@example.com`,
            firstName,
            lastName,
          },
          requestId: requestId(),
        },
        { onHeader: (h) => (requestIdHeader = h.get("x-request-id")) },
      );
      assert.ok(user);
      assert.match(user.id, UUID);
      assert.equal(user.tenantId, tenantId);
      assert.equal(user.firstName, firstName);
      assert.equal(user.lastName, lastName);
      assert.equal(user.email, `${firstName.toLowerCase()}.${suffix}@example.com`);
      assert.ok(user.etag.length > 0);
      assert.ok(requestIdHeader, "no x-request-id response header");
      created.push(user);
    }
  });

  it("gets a user by id", async () => {
    const { user } = await users.getUser({ id: created[0].id });
    assert.ok(user);
    assert.ok(equals(UserSchema, user, created[0]), "GetUser differs from CreateUser's answer");
  });

  it("lists the tenant's users, and one by an email filter", async () => {
    const all = await users.listUsers({ limit: 10, filter: { tenantId: { equalTo: tenantId } } });
    assert.equal(all.totalCount, 2n);
    assert.deepEqual(all.data.map((u) => u.id), created.map((u) => u.id)); // created_at ascending
    assert.equal(all.nextPageToken, "");

    const one = await users.listUsers({
      filter: { tenantId: { equalTo: tenantId }, email: { equalTo: created[1].email } },
    });
    assert.equal(one.totalCount, 1n);
    assert.equal(one.data.length, 1);
    assert.ok(equals(UserSchema, one.data[0], created[1]));
  });

  it("returns the same user to a retry with the same requestId", async () => {
    const request = {
      user: { tenantId, reference: `web-retry-${suffix}`, firstName: "Grace" },
      requestId: requestId(),
    };
    const first = (await users.createUser(request)).user;
    const retry = (await users.createUser(request)).user;
    assert.ok(first && retry);
    assert.ok(equals(UserSchema, retry, first), "the retry did not get the first response");
    created.push(first);
  });

  it("carries google.rpc.BadRequest details of INVALID_ARGUMENT", async () => {
    const err = await expectError(Code.InvalidArgument, () =>
      users.createUser({ user: { tenantId, email: "not an email", phone: "12" }, requestId: requestId() }),
    );
    const badRequests = err.findDetails(BadRequestSchema);
    assert.equal(badRequests.length, 1, "no BadRequest detail came through gRPC-Web");
    const fields = badRequests[0].fieldViolations.map((v) => v.field).sort();
    assert.deepEqual(fields, ["user.email", "user.phone"]);
    for (const v of badRequests[0].fieldViolations) assert.ok(v.description.length > 0);
    assert.equal(err.findDetails(ErrorInfoSchema)[0]?.reason, "INVALID_ARGUMENT");
    assert.ok(err.rawMessage.length > 0, "no grpc-message");
  });

  it("carries ErrorInfo of ALREADY_EXISTS for a duplicate reference", async () => {
    const err = await expectError(Code.AlreadyExists, () =>
      users.createUser({
        user: { tenantId, reference: created[0].reference, firstName: "Dup" },
        requestId: requestId(),
      }),
    );
    const infos = err.findDetails(ErrorInfoSchema);
    assert.equal(infos.length, 1);
    assert.equal(infos[0].reason, "ALREADY_EXISTS");
    assert.equal(infos[0].metadata.field, "reference");
  });

  it("answers NOT_FOUND for an unknown id", async () => {
    await expectError(Code.NotFound, () => users.getUser({ id: randomUUID() }));
  });

  it("answers UNAUTHENTICATED without a token, and with a wrong one (HTTP/2)", async () => {
    assert.ok(server);
    const anonymous = grpcWebClients(server.baseUrl, undefined, "2").users;
    await expectError(Code.Unauthenticated, () => anonymous.listUsers({ limit: 1 }));
    await expectError(Code.Unauthenticated, () => anonymous.getUser({ id: created[0].id }));
    const wrong = grpcWebClients(server.baseUrl, "usk_not_a_key", "2").users;
    await expectError(Code.Unauthenticated, () => wrong.listUsers({ limit: 1 }));
  });

  // Over HTTP/1.1 a refused call is answered from its headers, after the
  // service has read the body the client was still sending: repeated, so
  // that a connection closed under the client's write would show.
  it(
    "answers UNAUTHENTICATED without a token, and with a wrong one (HTTP/1.1)",
    async () => {
      assert.ok(server);
      const anonymous = grpcWebClients(server.baseUrl, undefined).users;
      const wrong = grpcWebClients(server.baseUrl, "usk_not_a_key").users;
      for (let i = 0; i < 3; i++) {
        await expectError(Code.Unauthenticated, () => anonymous.listUsers({ limit: 1 }));
        await expectError(Code.Unauthenticated, () => anonymous.getUser({ id: created[0].id }));
        await expectError(Code.Unauthenticated, () => wrong.listUsers({ limit: 1 }));
      }
    },
  );

  it("answers gRPC-Web over HTTP/2 too", async () => {
    assert.ok(server);
    const h2 = grpcWebClients(server.baseUrl, server.adminKey, "2").users;
    const page = await h2.listUsers({ filter: { tenantId: { equalTo: tenantId } } });
    assert.deepEqual(page.data.map((u) => u.id), created.map((u) => u.id));
    await expectError(Code.InvalidArgument, () =>
      h2.createUser({ user: { tenantId, email: "not an email" }, requestId: requestId() }),
    );
  });

  it("stops on SIGTERM with exit code 0", async () => {
    assert.ok(server);
    stopped = true;
    await stopCleanly(server);
  });
});
