// A small factory for the users-service clients: gRPC over HTTP/2 (plaintext
// for http:// URLs, TLS for https://), with the API key sent on every call.
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { UsersService } from "./gen/users/v1/users_pb.js";
import { TenantsService } from "./gen/users/v1/tenants_pb.js";

export interface UsersServiceClients {
  users: Client<typeof UsersService>;
  tenants: Client<typeof TenantsService>;
}

/** Sets `authorization: Bearer <apiKey>` on every request. */
export function bearerAuth(apiKey: string): Interceptor {
  return (next) => (req) => {
    req.header.set("authorization", `Bearer ${apiKey}`);
    return next(req);
  };
}

/**
 * Clients of users.v1.UsersService and users.v1.TenantsService.
 * `baseUrl` is like "http://127.0.0.1:50051"; without `apiKey` no credentials
 * are sent (every users.v1 call is then UNAUTHENTICATED).
 */
export function createUsersServiceClients(options: {
  baseUrl: string;
  apiKey?: string;
}): UsersServiceClients {
  const transport = createGrpcTransport({
    baseUrl: options.baseUrl,
    interceptors: options.apiKey === undefined ? [] : [bearerAuth(options.apiKey)],
  });
  return {
    users: createClient(UsersService, transport),
    tenants: createClient(TenantsService, transport),
  };
}
