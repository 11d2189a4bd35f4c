"""A real S3 server on 127.0.0.1 for tests (moto's server mode), and a TCP proxy that breaks
connections on purpose.

    # in a conftest.py
    from tests.helpers.s3_server import s3_server  # noqa: F401  (registers the fixture)

    def test_x(s3_server, monkeypatch):
        monkeypatch.setenv(...)            # or: s3_server.use(monkeypatch)
        url = s3_server.new_bucket() + "/store"

The server holds everything in memory and is started once per session (~2 s). Clients find it
the standard way, through AWS_ENDPOINT_URL and the AWS_* credential variables (`env`), so the
code under test resolves endpoint and credentials exactly as it would for a real bucket.
`FaultProxy` sits between a client and the server and resets connections in the middle of a
response: the "connection reset mid-read" fault, on real sockets.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0
_bucket_ids = itertools.count()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_command() -> list[str]:
    exe = Path(sys.executable).parent / "moto_server"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("moto_server")
    return [found] if found else [sys.executable, "-m", "moto.server"]


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client (or a subprocess) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            # No ~/.aws files of the machine running the tests may leak in.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            # Never ask a cloud's instance-metadata address for credentials.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def use(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for k, v in self.env.items():
            monkeypatch.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(k, raising=False)

    def new_bucket(self) -> str:
        """A fresh, empty bucket; returns ``s3://NAME``."""
        name = f"zf-test-{os.getpid()}-{next(_bucket_ids)}"
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(req, timeout=10) as response:
            assert response.status == 200, response.status
        return f"s3://{name}"

    def reset(self) -> None:
        """Forget every bucket (moto's own reset endpoint)."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()


def _ready(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/moto-api/", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_s3_server(log_path: Path, env: dict[str, str] | None = None) -> S3Server:
    last = ""
    for _attempt in range(3):
        port = free_port()
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [*_moto_command(), "-H", "127.0.0.1", "-p", str(port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        server = S3Server(f"http://127.0.0.1:{port}", process, log_path)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            if _ready(server.endpoint):
                return server
            time.sleep(0.1)
        stop_s3_server(server)
        last = log_path.read_text(errors="replace")
        if "address already in use" not in last.lower():
            break
    raise RuntimeError(f"moto_server did not start; its log ends:\n{last[-3000:]}")


def stop_s3_server(server: S3Server) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, 15)
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, 9)
        server.process.wait(timeout=10)


@contextlib.contextmanager
def running_s3_server(root: Path, env: dict[str, str] | None = None) -> Iterator[S3Server]:
    server = start_s3_server(Path(root) / "moto.log", env)
    try:
        yield server
    finally:
        stop_s3_server(server)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One real S3 server (moto) for the whole session."""
    with running_s3_server(tmp_path_factory.mktemp("s3-server")) as server:
        yield server


# --- faults on real sockets ----------------------------------------------------------------------
@dataclass
class FaultProxy:
    """A TCP proxy in front of ``upstream`` (host, port). ``reset_responses(n, after)`` makes the
    next ``n`` connections that carry response bytes reset (RST) after ``after`` bytes of the
    response have been forwarded; ``reset_responses(-1, after)`` does it to every connection.
    Connections open when the faults are set are reset at once, so a client's pooled
    keep-alive connections cannot dodge them."""

    upstream: tuple[str, int]
    port: int = field(default_factory=free_port)
    resets_done: int = 0
    _left: int = 0
    _after: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _live: set = field(default_factory=set)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset_responses(self, n: int, after: int = 1000) -> None:
        with self._lock:
            self._left, self._after = n, after
            live, self._live = list(self._live), set()
        for s in live:
            _reset(s)

    def start(self) -> FaultProxy:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()

    def _take_fault(self) -> int | None:
        with self._lock:
            if self._left == 0:
                return None
            if self._left > 0:
                self._left -= 1
            self.resets_done += 1
            return self._after

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=30)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._live.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, response: bool | None) -> None:
        budget = None
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if response and budget is None:
                    fault = self._take_fault()
                    budget = -1 if fault is None else fault
                if budget is not None and budget >= 0:
                    if len(data) >= budget:
                        dst.sendall(data[:budget])
                        _reset(dst)
                        _reset(src)
                        return
                    budget -= len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()


def _reset(s: socket.socket) -> None:
    """Close with RST instead of FIN: what a dropped connection looks like to the peer. The
    read shutdown wakes the other pump thread's recv() on this socket; until that returns the
    kernel would keep the socket open, and the peer would only notice at its read timeout."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RD)
    s.close()
