// Starts and stops the real users-service binary for the tests: its own
// embedded Postgres in a fresh data dir under /tmp, a free port, the bootstrap
// admin key, and a SIGTERM shutdown. Shared by every test file.
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { chmodSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import http2 from "node:http2";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Code, ConnectError } from "@connectrpc/connect";

export const packageDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
export const serverBin = path.resolve(
  packageDir,
  process.env.USERS_SERVICE_BIN ?? "../../target/debug/users-service",
);
export const STARTUP_TIMEOUT_MS = 30_000;
export const SHUTDOWN_TIMEOUT_MS = 30_000;

export type Exit = { code: number | null; signal: NodeJS.Signals | null };

export interface Server {
  child: ChildProcess;
  exited: Promise<Exit>;
  dataDir: string;
  logFile: string;
  /** http://127.0.0.1:<port>: gRPC (HTTP/2) and gRPC-Web (HTTP/1.1 and HTTP/2). */
  baseUrl: string;
  adminKey: string;
  /** http://127.0.0.1:<port>/metrics when started with `metrics: true`. */
  metricsUrl?: string;
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address() as net.AddressInfo;
      probe.close(() => resolve(port));
    });
  });
}

/**
 * grpc.health.v1.Health/Check with no service name, by hand over HTTP/2 (no
 * generated code): an empty request frame; the answer's field 1 is the status
 * (1 = SERVING). Resolves undefined while the server is not answering.
 */
function healthStatus(port: number): Promise<number | undefined> {
  return new Promise((resolve) => {
    const session = http2.connect(`http://127.0.0.1:${port}`);
    const done = (status: number | undefined) => {
      session.close();
      session.destroy();
      resolve(status);
    };
    session.on("error", () => done(undefined));
    session.setTimeout(1_000, () => done(undefined));
    const req = session.request({
      ":method": "POST",
      ":path": "/grpc.health.v1.Health/Check",
      "content-type": "application/grpc",
      te: "trailers",
    });
    const chunks: Buffer[] = [];
    let grpcStatus: string | undefined;
    req.on("response", (headers) => {
      grpcStatus ??= headers["grpc-status"] as string | undefined;
    });
    req.on("trailers", (trailers) => {
      grpcStatus ??= trailers["grpc-status"] as string | undefined;
    });
    req.on("data", (chunk: Buffer) => chunks.push(chunk));
    req.on("error", () => done(undefined));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      if (grpcStatus !== "0" || body.length < 5) return done(undefined);
      const message = body.subarray(5, 5 + body.readUInt32BE(1));
      // HealthCheckResponse { ServingStatus status = 1; }: tag 0x08, then a one-byte varint.
      done(message.length >= 2 && message[0] === 0x08 ? message[1] : 0);
    });
    req.end(Buffer.alloc(5)); // uncompressed, zero-length message
  });
}

/**
 * Starts the server and waits until it is SERVING. `args` are added to the
 * command line (e.g. `--cors-allowed-origin`); `metrics` also serves
 * Prometheus metrics on another free port.
 */
export async function startServer(options: { args?: string[]; metrics?: boolean } = {}): Promise<Server> {
  assert.ok(existsSync(serverBin), `no server binary at ${serverBin} (cargo build, or set USERS_SERVICE_BIN)`);
  const dataDir = mkdtempSync("/tmp/users-ts-");
  chmodSync(dataDir, 0o755); // the embedded Postgres runs as `postgres` when we are root
  const logFile = path.join(dataDir, "server.log");
  const port = await freePort();
  const metricsPort = options.metrics ? await freePort() : undefined;
  const env: NodeJS.ProcessEnv = { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "info" };
  delete env.DATABASE_URL; // run the server's own embedded Postgres
  delete env.CORS_ALLOWED_ORIGINS; // only what a test asks for
  const log = openSync(logFile, "a");
  const child = spawn(
    serverBin,
    [
      "--listen", `127.0.0.1:${port}`,
      "--data-dir", dataDir,
      "--rate-limit-per-second", "0",
      ...(metricsPort === undefined ? [] : ["--metrics-listen", `127.0.0.1:${metricsPort}`]),
      ...(options.args ?? []),
    ],
    { env, stdio: ["ignore", log, log] },
  );
  const exited = new Promise<Exit>((resolve) =>
    child.once("exit", (code, signal) => resolve({ code, signal })),
  );
  let exit: Exit | undefined;
  void exited.then((e) => (exit = e));

  const deadline = Date.now() + STARTUP_TIMEOUT_MS;
  for (;;) {
    if (exit) {
      throw new Error(`server exited during startup (${JSON.stringify(exit)}), log ${logFile}:\n${tail(logFile)}`);
    }
    if ((await healthStatus(port)) === 1) break;
    if (Date.now() > deadline) {
      await stopServer({ child, exited }, SHUTDOWN_TIMEOUT_MS);
      throw new Error(`server not SERVING after ${STARTUP_TIMEOUT_MS} ms, log ${logFile}:\n${tail(logFile)}`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  const adminKey = readFileSync(path.join(dataDir, "admin.key"), "utf8").trim();
  assert.ok(adminKey.length > 0, "admin.key is empty");
  return {
    child,
    exited,
    dataDir,
    logFile,
    baseUrl: `http://127.0.0.1:${port}`,
    adminKey,
    metricsUrl: metricsPort === undefined ? undefined : `http://127.0.0.1:${metricsPort}/metrics`,
  };
}

/** SIGTERM, then SIGKILL if the server is still running after `graceMs`. */
export async function stopServer(
  server: Pick<Server, "child" | "exited">,
  graceMs = SHUTDOWN_TIMEOUT_MS,
): Promise<Exit | "killed"> {
  server.child.kill("SIGTERM");
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<"late">((resolve) => (timer = setTimeout(() => resolve("late"), graceMs)));
  const result = await Promise.race([server.exited, late]);
  clearTimeout(timer);
  if (result !== "late") return result;
  server.child.kill("SIGKILL");
  await server.exited;
  return "killed";
}

/** Stops `server` with SIGTERM, checks that it exits with code 0, and removes its data directory. */
export async function stopCleanly(server: Server): Promise<void> {
  const result = await stopServer(server);
  assert.deepEqual(result, { code: 0, signal: null }, `log ${server.logFile}:\n${tail(server.logFile)}`);
  rmSync(server.dataDir, { recursive: true, force: true });
}

export function tail(file: string, lines = 40): string {
  try {
    return readFileSync(file, "utf8").split("\n").slice(-lines).join("\n");
  } catch {
    return "(no log)";
  }
}

/**
 * How many calls of `method` (e.g. "ListUsers") the server has started, by
 * its Prometheus counter grpc_server_started (0 before the first).
 */
export async function callsStarted(server: Server, method: string): Promise<number> {
  assert.ok(server.metricsUrl, "the server was started without metrics");
  const res = await fetch(server.metricsUrl);
  assert.equal(res.status, 200, `GET ${server.metricsUrl}`);
  let total = 0;
  for (const line of (await res.text()).split("\n")) {
    if (line.startsWith("grpc_server_started") && line.includes(`grpc_method="${method}"`)) {
      total += Number(line.slice(line.lastIndexOf(" ") + 1));
    }
  }
  return total;
}

/** Runs `call`, which must fail with a ConnectError of `code`; returns the error. */
export async function expectError(code: Code, call: () => Promise<unknown>): Promise<ConnectError> {
  try {
    await call();
  } catch (e) {
    const err = ConnectError.from(e);
    assert.equal(Code[err.code], Code[code], `expected ${Code[code]}, got ${Code[err.code]}: ${err.message}`);
    return err;
  }
  assert.fail(`expected ${Code[code]}, the call succeeded`);
}
