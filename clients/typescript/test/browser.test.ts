// A web page calls the real users-service through gRPC-Web in headless
// Chromium (Debian's /usr/bin/chromium, driven by playwright-core). The page
// (web/index.html + web/main.ts, bundled here with esbuild) is served by a tiny
// HTTP server on another port than the service's, so its calls are
// cross-origin: the service is started with --cors-allowed-origin naming that
// page's origin only. The same page from a second port (an origin not
// allowed) must be refused by the browser, and the service must not see its
// call.
//
// Without Chromium the suite is skipped, unless CI is set: then it fails.
import { after, before, describe, it, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync } from "node:fs";
import http from "node:http";
import type net from "node:net";
import path from "node:path";
import { build } from "esbuild";
import { chromium, type Browser, type Page } from "playwright-core";
import { createUsersServiceClients } from "../src/client.js";
import { callsStarted, packageDir, startServer, stopCleanly, stopServer, tail, type Server } from "./server.js";

const CHROMIUM = process.env.CHROMIUM_BIN ?? "/usr/bin/chromium";
const IN_CI = !!process.env.CI && process.env.CI !== "false" && process.env.CI !== "0";
const skip =
  !existsSync(CHROMIUM) && !IN_CI
    ? `no Chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM_BIN); with CI=true this fails instead`
    : false;
/** How long a page may take to call the service and render the answer. */
const PAGE_TIMEOUT_MS = 20_000;

/** Serves web/index.html and the bundle of web/main.ts on a free port of 127.0.0.1. */
async function servePage(html: string, bundle: string): Promise<{ origin: string; server: http.Server }> {
  const server = http.createServer((req, res) => {
    const url = new URL(req.url ?? "/", "http://localhost");
    if (req.method === "GET" && (url.pathname === "/" || url.pathname === "/index.html")) {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" });
      res.end(html);
    } else if (req.method === "GET" && url.pathname === "/dist/main.js") {
      res.writeHead(200, { "content-type": "text/javascript; charset=utf-8", "cache-control": "no-store" });
      res.end(bundle);
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const { port } = server.address() as net.AddressInfo;
  return { origin: `http://127.0.0.1:${port}`, server };
}

/** A CORS preflight of ListUsers from `origin`, as Chromium sends it. */
function preflight(baseUrl: string, origin: string): Promise<http.IncomingMessage> {
  return new Promise((resolve, reject) => {
    const req = http.request(`${baseUrl}/users.v1.UsersService/ListUsers`, {
      method: "OPTIONS",
      headers: {
        origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type,x-grpc-web,x-user-agent",
      },
    });
    req.on("error", reject);
    req.on("response", (res) => {
      res.resume();
      res.on("end", () => resolve(res));
    });
    req.end();
  });
}

const csv = (value: string | string[] | undefined): string[] =>
  String(value ?? "").split(",").map((s) => s.trim().toLowerCase()).filter((s) => s !== "");

describe("users-service from a web page (headless Chromium, gRPC-Web, CORS)", { skip }, () => {
  let server: Server | undefined;
  let stopped = false;
  let browser: Browser | undefined;
  const pageServers: http.Server[] = [];
  let allowedOrigin: string;
  let otherOrigin: string;
  let tenantId: string;
  const emails: string[] = [];
  let shotsDir: string; // the screenshots, kept

  before(async () => {
    assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: apt-get install chromium (CI=true: not skipped)`);
    shotsDir = mkdtempSync("/tmp/users-web-");
    const html = readFileSync(path.join(packageDir, "web/index.html"), "utf8");
    const bundled = await build({
      entryPoints: [path.join(packageDir, "web/main.ts")],
      bundle: true,
      format: "esm",
      target: "es2022",
      platform: "browser",
      write: false,
      logLevel: "warning",
    });
    const bundle = bundled.outputFiles[0].text;
    const allowed = await servePage(html, bundle);
    const other = await servePage(html, bundle);
    pageServers.push(allowed.server, other.server);
    allowedOrigin = allowed.origin;
    otherOrigin = other.origin;

    server = await startServer({ args: ["--cors-allowed-origin", allowedOrigin], metrics: true });

    // The users, made over gRPC (HTTP/2) from Node, in a tenant of their own.
    const { tenants, users } = createUsersServiceClients({ baseUrl: server.baseUrl, apiKey: server.adminKey });
    const suffix = randomUUID().slice(0, 8);
    const { tenant } = await tenants.createTenant({
      tenant: { name: "Browser", reference: `ts-browser-${suffix}` },
      requestId: randomUUID(),
    });
    assert.ok(tenant);
    tenantId = tenant.id;
    for (const [firstName, lastName] of [["Ada", "Lovelace"], ["Grace", "Hopper"], ["Margaret", "Hamilton"]]) {
      const email = `${firstName.toLowerCase()}.${suffix}@example.com`;
      const { user } = await users.createUser({
        user: { tenantId, email, firstName, lastName },
        requestId: randomUUID(),
      });
      assert.equal(user?.email, email);
      emails.push(email);
    }

    browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  });

  after(async () => {
    await browser?.close();
    for (const s of pageServers) {
      s.closeAllConnections();
      await new Promise((resolve) => s.close(resolve));
    }
    if (server && !stopped) {
      const result = await stopServer(server);
      console.error(`server stopped (${JSON.stringify(result)}), log kept in ${server.logFile}:\n${tail(server.logFile)}`);
    }
  });

  /**
   * Opens the page from `origin` in a fresh browser context, waits for its
   * status, and keeps a screenshot. Returns the page (closed with its
   * context by the caller) and what the browser's console said.
   */
  async function openPage(t: TestContext, origin: string, token: string, shot: string) {
    assert.ok(browser && server);
    const context = await browser.newContext();
    const page = await context.newPage();
    const consoleLines: string[] = [];
    page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));
    const failed: string[] = [];
    page.on("requestfailed", (r) => failed.push(`${r.method()} ${r.url()}: ${r.failure()?.errorText}`));
    const fragment = new URLSearchParams({ server: server.baseUrl, token, tenant: tenantId });
    await page.goto(`${origin}/index.html#${fragment}`);
    await page.locator('#status:not([data-status="pending"])').waitFor({ timeout: PAGE_TIMEOUT_MS });
    const file = path.join(shotsDir, shot);
    await page.screenshot({ path: file, fullPage: true });
    t.diagnostic(`screenshot: ${file}`);
    for (const line of [...consoleLines, ...failed]) t.diagnostic(line);
    return { page, consoleLines, failed, close: () => context.close() };
  }

  const status = (page: Page) => page.locator("#status").textContent();
  const listed = (page: Page) =>
    page.locator("#users li").evaluateAll((lis) => lis.map((li) => li.getAttribute("data-email")));

  it("answers the preflight of the allowed origin only", async () => {
    assert.ok(server);
    const ok = await preflight(server.baseUrl, allowedOrigin);
    assert.equal(ok.headers["access-control-allow-origin"], allowedOrigin);
    assert.deepEqual(csv(ok.headers["access-control-allow-methods"]), ["post"]);
    const allowedHeaders = csv(ok.headers["access-control-allow-headers"]);
    for (const h of ["authorization", "content-type", "x-grpc-web", "x-user-agent", "grpc-timeout"]) {
      assert.ok(allowedHeaders.includes(h), `${h} is not in access-control-allow-headers: ${allowedHeaders}`);
    }
    assert.equal(ok.headers["access-control-max-age"], "3600");

    const refused = await preflight(server.baseUrl, otherOrigin);
    assert.equal(refused.headers["access-control-allow-origin"], undefined, "another origin is allowed");
  });

  it("lists exactly the tenant's users in a page of the allowed origin", async (t) => {
    assert.ok(server);
    const before = await callsStarted(server, "ListUsers");
    const { page, close } = await openPage(t, allowedOrigin, server.adminKey, "allowed-origin.png");
    try {
      assert.equal(await status(page), "ok", `the page says: ${await page.locator("#message").textContent()}`);
      assert.deepEqual(await listed(page), emails); // created_at ascending
      assert.equal(await page.locator("#users").getAttribute("data-total-count"), "3");
      // x-request-id is read by the page: the service exposes it to the browser.
      assert.ok(await page.locator("#users").getAttribute("data-request-id"), "x-request-id is not exposed");
    } finally {
      await close();
    }
    assert.equal(await callsStarted(server, "ListUsers"), before + 1, "the service did not count the page's ListUsers");
  });

  it("shows UNAUTHENTICATED to a page of the allowed origin with a wrong token", async (t) => {
    assert.ok(server);
    const { page, close } = await openPage(t, allowedOrigin, "usk_not_a_key", "wrong-token.png");
    try {
      // A trailers-only answer: grpc-status is a response header the service exposes.
      assert.equal(await status(page), "error: UNAUTHENTICATED", `the page says: ${await page.locator("#message").textContent()}`);
      assert.deepEqual(await listed(page), []);
    } finally {
      await close();
    }
  });

  it("is refused by the browser (CORS) in a page of an origin not allowed, and the service sees no call", async (t) => {
    assert.ok(server);
    const before = await callsStarted(server, "ListUsers");
    const { page, consoleLines, close } = await openPage(t, otherOrigin, server.adminKey, "other-origin.png");
    try {
      // fetch() rejects with a TypeError, which Connect reports as UNKNOWN.
      assert.equal(await status(page), "error: UNKNOWN");
      assert.equal(await page.locator("#message").textContent(), "Failed to fetch");
      assert.deepEqual(await listed(page), []);
      assert.ok(
        consoleLines.some((l) => l.includes("CORS policy")),
        `the browser logged no CORS refusal:\n${consoleLines.join("\n")}`,
      );
    } finally {
      await close();
    }
    assert.equal(await callsStarted(server, "ListUsers"), before, "the service received a ListUsers from the refused origin");
  });

  it("stops on SIGTERM with exit code 0", async () => {
    assert.ok(server);
    stopped = true;
    await stopCleanly(server);
  });
});
