"""Fixtures shared by the whole suite."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# A bare `pytest` from a Python without the project installed would fail in every conftest with
# ModuleNotFoundError; say once what to run instead.
_missing = [m for m in ("zeroforge", "torch") if importlib.util.find_spec(m) is None]
if _missing:
    pytest.exit(f"{' and '.join(_missing)} not importable from this Python ({sys.executable}): "
                "run the suite with `bash scripts/test.sh` (README), which installs everything "
                "into .venv, or activate .venv first", returncode=4)

# A real `mlflow server` for the whole session, started on first use
# (tests/helpers/mlflow_server.py); importing the fixture here registers it once for every test.
from tests.helpers.mlflow_server import mlflow_server  # noqa: E402, F401  (after the check)

# A real S3 server (moto) on 127.0.0.1 for the session, started on first use.
from tests.helpers.s3_server import s3_server  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora in ../shared/data (tinyshakespeare, wikitext-2). The only way tests
    reach ../shared: absent on a plain clone, and then the tests that need it skip."""
    if not (SHARED_DATA / "tinyshakespeare.txt").is_file():
        pytest.skip(f"real corpora not found at {SHARED_DATA} (../shared/data beside the repo)")
    return SHARED_DATA
