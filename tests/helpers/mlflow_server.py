"""A real `mlflow server` on 127.0.0.1 for tests (sqlite backend, proxied artifacts in a tmp dir).

Use the session fixture, so the suite starts one server (~7 s on 2 cores, ~0.5 GB):

    # in a conftest.py
    from tests.helpers.mlflow_server import mlflow_server  # noqa: F401  (registers the fixture)

    def test_x(mlflow_server):
        tracker = make_tracker(TrackingConfig(tracking_uri=mlflow_server.uri), ...)
        MlflowClient(mlflow_server.uri).get_run(tracker.run_id)

A subprocess under test (a `zeroforge train` CLI run) reaches it with
`env={**os.environ, **mlflow_server.env}`. Outside pytest: `with running_mlflow_server(dir) as s:`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Job execution (huey workers) would take the server from ~0.5 GB to ~2.6 GB; tests need none.
SERVER_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}
START_TIMEOUT_S = 120.0


@dataclass
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT
    port: int
    root: Path  # holds mlflow.db, artifacts/ and server.log
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        """Environment for a child process that should log to this server."""
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_DISABLE_TELEMETRY": "true"}

    @property
    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


def free_port() -> int:
    # The port may be taken again before the server binds it; start_mlflow_server retries.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_command() -> list[str]:
    exe = Path(sys.executable).parent / "mlflow"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("mlflow")
    return [found] if found else [sys.executable, "-m", "mlflow"]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_mlflow_server(root: Path, timeout: float = START_TIMEOUT_S) -> MlflowServer:
    """Start a server storing everything under `root`; returns once /health answers."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    last_log = ""
    for _attempt in range(3):
        port = free_port()
        log = open(root / "server.log", "w")  # noqa: SIM115 -- the server process owns it
        process = subprocess.Popen(
            [
                *_mlflow_command(), "server",
                "--host", "127.0.0.1",
                "--port", str(port),
                "--workers", "1",
                "--backend-store-uri", f"sqlite:///{(root / 'mlflow.db').resolve()}",
                "--serve-artifacts",
                "--artifacts-destination", str((root / "artifacts").resolve()),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **SERVER_ENV},
            start_new_session=True,  # own process group: teardown kills uvicorn workers too
        )
        log.close()
        server = MlflowServer(f"http://127.0.0.1:{port}", port, root, process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if _healthy(server.uri):
                return server
            time.sleep(0.2)
        last_log = server.log
        stop_mlflow_server(server)
        if "address already in use" not in last_log.lower():
            break
    raise RuntimeError(f"mlflow server did not become healthy; its log ends:\n{last_log[-3000:]}")


def stop_mlflow_server(server: MlflowServer, grace: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    # The group may outlive its leader (uvicorn worker), so always sweep it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=grace)


@contextlib.contextmanager
def running_mlflow_server(root: Path) -> Iterator[MlflowServer]:
    server = start_mlflow_server(root)
    try:
        yield server
    finally:
        stop_mlflow_server(server)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real MLflow tracking server for the whole session (see the module docstring)."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server
