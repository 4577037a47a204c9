"""Fixtures of the Python client scenario: fresh stubs, and a real users-service.

The server is the binary built by `cargo build` (USERS_SERVICE_BIN, default
target/debug/users-service, relative paths taken from the repository root). It
runs on a free 127.0.0.1 port, on its own embedded Postgres in a fresh data
directory, with per-caller rate limiting off.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import generate

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90  # initdb + Postgres start + migrations on a 2-core machine
STOP_TIMEOUT_S = 30  # --shutdown-grace is 10 s, then Postgres stops


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """Stubs generated now from ../../proto into a temporary directory, imported."""
    out = generate.generate(tmp_path_factory.mktemp("stubs"))
    # First on sys.path: `google` and `google.rpc` are namespace packages, so
    # google.rpc.error_details_pb2 comes from our vendored proto while
    # google.rpc.status_pb2 (used by grpcio-status) still comes from
    # googleapis-common-protos.
    sys.path.insert(0, str(out))
    importlib.invalidate_caches()
    modules = SimpleNamespace(
        users=importlib.import_module("users.v1.users_pb2"),
        users_grpc=importlib.import_module("users.v1.users_pb2_grpc"),
        tenants=importlib.import_module("users.v1.tenants_pb2"),
        tenants_grpc=importlib.import_module("users.v1.tenants_pb2_grpc"),
        common=importlib.import_module("users.v1.common_pb2"),
        error_details=importlib.import_module("google.rpc.error_details_pb2"),
    )
    for module in vars(modules).values():
        assert Path(module.__file__).resolve().is_relative_to(out), f"{module.__name__} not from {out}"
    return modules


@dataclass
class Server:
    address: str
    token: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"

    def stop(self) -> int:
        """SIGTERM, then wait for the exit code (idempotent)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"server did not stop within {STOP_TIMEOUT_S}s of SIGTERM\n{self.log_tail()}")


def _binary() -> Path:
    path = Path(os.environ.get("USERS_SERVICE_BIN", "target/debug/users-service"))
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not os.access(path, os.X_OK):
        pytest.fail(f"users-service binary not found at {path}: run `cargo build` or set USERS_SERVICE_BIN")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(server: Server, data_dir: Path) -> bool:
    """True once health answers SERVING and admin.key exists; False if the process died."""
    deadline = time.monotonic() + START_TIMEOUT_S
    with grpc.insecure_channel(server.address) as channel:  # plain channel, no credentials
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                return False
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING and (data_dir / "admin.key").exists():
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    server.process.kill()
    server.process.wait()
    pytest.fail(f"server not SERVING within {START_TIMEOUT_S}s\n{server.log_tail()}")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A running users-service; stopped with SIGTERM at the end (must exit 0)."""
    binary = _binary()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DATA_DIR", "LISTEN_ADDR")}
    logs = tmp_path_factory.mktemp("server-log")
    # Postgres runs as the `postgres` user when we are root: the directory must be
    # reachable by it, so a plain mkdtemp in /tmp, not pytest's 0700 tmp_path.
    data_dir = Path(tempfile.mkdtemp(prefix="users-service-py."))
    data_dir.chmod(0o755)
    started = None
    try:
        for attempt in range(3):  # a port picked free can be taken before the server binds it
            address = f"127.0.0.1:{_free_port()}"
            log_path = logs / f"service-{attempt}.log"
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    [str(binary), "--listen", address, "--data-dir", str(data_dir), "--rate-limit-per-second", "0"],
                    env=env,
                    cwd=REPO_ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            candidate = Server(address, "", process, log_path)
            if _wait_serving(candidate, data_dir):
                started = candidate
                break
            print(f"server exited during start-up (code {process.returncode}):\n{candidate.log_tail()}", file=sys.stderr)
        if started is None:
            pytest.fail("users-service did not start; see the captured logs above")
        started.token = (data_dir / "admin.key").read_text().strip()
        assert started.token, "admin.key is empty"
        yield started
        code = started.stop()
        assert code == 0, f"users-service exited {code} after SIGTERM\n{started.log_tail()}"
    finally:
        if started is not None and started.process.poll() is None:
            started.process.kill()
            started.process.wait()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="session")
def auth(server):
    """Call metadata carrying the bootstrap admin key."""
    return (("authorization", f"Bearer {server.token}"),)


@pytest.fixture(scope="session")
def users(pb, channel):
    return pb.users_grpc.UsersServiceStub(channel)
