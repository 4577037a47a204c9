// The browser end of the gRPC-Web test: calls users.v1.UsersService/ListUsers
// with Connect's gRPC-Web transport (fetch) and renders the users' emails as
// <li data-email="..."> in #users, then "ok" or "error: <CODE>" in #status.
// Bundled with esbuild (see README.md); the test serves it from another
// origin than the service's, so every call is a CORS request.
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { UsersService } from "../src/gen/users/v1/users_pb.js";

/** "InvalidArgument" -> "INVALID_ARGUMENT", as gRPC names its codes. */
function codeName(code: Code): string {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

function element<T extends HTMLElement>(id: string): T {
  const el = document.getElementById(id);
  if (!el) throw new Error(`no #${id}`);
  return el as T;
}

function setStatus(status: "ok" | "error", text: string, message = ""): void {
  const out = element<HTMLOutputElement>("status");
  out.dataset.status = status;
  out.textContent = text;
  element("message").textContent = message;
}

async function main(): Promise<void> {
  const params = new URLSearchParams(location.hash.slice(1));
  const server = params.get("server");
  const token = params.get("token");
  const tenant = params.get("tenant");
  if (!server) throw new Error("the page's fragment names no server=");

  const bearer: Interceptor = (next) => (req) => {
    if (token) req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
  const users = createClient(
    UsersService,
    createGrpcWebTransport({ baseUrl: server, interceptors: [bearer] }),
  );

  let requestId = "";
  try {
    const page = await users.listUsers(
      {
        limit: 100,
        filter: tenant ? { tenantId: { equalTo: tenant } } : undefined,
      },
      // Readable only because the service exposes it (Access-Control-Expose-Headers).
      { onHeader: (header) => (requestId = header.get("x-request-id") ?? "") },
    );
    const list = element<HTMLUListElement>("users");
    for (const user of page.data) {
      const li = document.createElement("li");
      li.dataset.email = user.email;
      li.textContent = `${user.email} (${user.firstName} ${user.lastName})`;
      list.append(li);
    }
    list.dataset.totalCount = String(page.totalCount ?? "");
    list.dataset.requestId = requestId;
    setStatus("ok", "ok");
  } catch (e) {
    const err = ConnectError.from(e);
    setStatus("error", `error: ${codeName(err.code)}`, err.rawMessage);
  }
}

main().catch((e: unknown) => setStatus("error", "error: PAGE", String(e)));
