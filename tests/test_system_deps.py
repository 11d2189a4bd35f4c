"""scripts/system-deps.sh waits for the apt/dpkg locks another package manager holds, instead of
failing at once ("Could not get lock /var/lib/dpkg/lock-frontend" once failed a CI run).

The test holds the real locks (fcntl, as apt and dpkg take them) for a few seconds while the
script installs a tiny package through the real apt-get, then removes that package again. It
needs root, apt-get and the Debian mirror, as the script itself does.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "hello"  # GNU hello: ~50 kB, no dependencies worth naming
LOCKS = ("/var/lib/dpkg/lock-frontend", "/var/lib/apt/lists/lock")
HOLD_S = 6


def _installed(package: str) -> bool:
    return subprocess.run(["dpkg", "-s", package], capture_output=True).returncode == 0


@pytest.fixture
def apt_machine():
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("needs root and apt-get (as scripts/system-deps.sh does)")
    if _installed(PACKAGE):
        pytest.skip(f"{PACKAGE} is installed already: nothing for the script to install")
    probe = subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=120", "install", "-s", "-qq",
                            PACKAGE], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"apt cannot install {PACKAGE} here: {probe.stderr.strip()[-200:]}")
    yield
    subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=120", "purge", "-y", "-qq", PACKAGE],
                   capture_output=True)


def test_waits_for_apt_and_dpkg_locks_then_installs(apt_machine):
    held, release = threading.Event(), threading.Event()  # release: only if the test fails

    def hold() -> None:
        fds = []
        for lock in LOCKS:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o640)
            fcntl.lockf(fd, fcntl.LOCK_EX)
            fds.append(fd)
        held.set()
        # The lists lock (apt-get update) first, dpkg's later: the install must wait as well.
        release.wait(HOLD_S / 2)
        os.close(fds.pop())
        release.wait(HOLD_S / 2)
        os.close(fds.pop())

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(120), "could not take the apt locks (another apt process is running?)"
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(REPO / "scripts" / "system-deps.sh")], capture_output=True,
                       text=True, timeout=600,
                       env={**os.environ, "ZEROFORGE_SYSTEM_PACKAGES": PACKAGE})
    elapsed = time.monotonic() - t0
    release.set()
    holder.join()
    assert p.returncode == 0, p.stderr
    assert elapsed >= HOLD_S - 1, "it did not wait for the locks"
    assert "waiting for the apt package-lists lock" in p.stderr
    assert _installed(PACKAGE)
